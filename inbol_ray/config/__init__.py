"""Typed run configuration: section dataclasses (`sections`) built from layered YAML + overrides (`loading`)."""

from inbol_ray.config.data_sections import (
    BaseTrainConfig,
    DataConfig,
    DatasetSpec,
    ModelConfig,
    ShapesConfig,
)
from inbol_ray.config.errors import ConfigError
from inbol_ray.config.loading import apply_overrides, load_config, merge_layers
from inbol_ray.config.sections import (
    CheckpointConfig,
    Config,
    ConstructConfig,
    EvalConfig,
    GradingConfig,
    PromptConfig,
    RayConfig,
    SamplingConfig,
    ServeConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "BaseTrainConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "ConstructConfig",
    "DataConfig",
    "DatasetSpec",
    "EvalConfig",
    "GradingConfig",
    "ModelConfig",
    "PromptConfig",
    "RayConfig",
    "SamplingConfig",
    "ServeConfig",
    "ShapesConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "merge_layers",
]
