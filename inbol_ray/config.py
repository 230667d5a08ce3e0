"""Typed run configuration: nested dataclasses loaded from YAML with dotted CLI overrides.

Every threshold of the method lives here (DESIGN.md: "never a literal in code"). Loading is strict: an
unknown key or a value of the wrong type is one clear line naming the dotted key, because a typo in a
YAML that silently falls back to a default would quietly change an experiment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key, value or path."""


@dataclass
class ModelConfig:
    path: str = "runs/tiny/model/init"
    """HF model directory (local path). For the embedded default the tiny checkpoint is built here."""
    build_tiny: bool = False
    """Build the tiny LLaVA checkpoint at `path` when it does not exist (embedded default only)."""
    seed: int = 0
    """Seed of the tiny checkpoint's weights and tokenizer."""
    image_size: int = 48
    """Tiny model: square input resolution of the vision tower."""
    patch_size: int = 16
    """Tiny model: ViT patch size; image tokens = (image_size / patch_size)^2. 48/16 puts one
    ShapesWorld grid cell in one patch, which lets a from-scratch tower learn to see in minutes."""
    text_hidden: int = 128
    """Tiny model: LM width. Heads are 64 wide so vLLM's attention backends accept the model."""
    text_layers: int = 2
    vision_hidden: int = 128
    vision_layers: int = 2
    vocab_size: int = 512
    """Tiny model: BPE vocabulary size trained on ShapesWorld text."""
    dtype: str = "float32"
    """Weights dtype for inference and training (float32 | bfloat16 | float16)."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size ({self.image_size}) must be a multiple of model.patch_size")
        for name in ("text_hidden", "vision_hidden"):
            width = getattr(self, name)
            if width % 64:
                raise ConfigError(f"model.{name} ({width}) must be a multiple of 64 (head size 64)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be float32|bfloat16|float16, got {self.dtype!r}")


@dataclass
class ShapesConfig:
    seed: int = 0
    n_pretrain: int = 6000
    """Base-model training items (answerable only, rare names almost never shown): what the base
    model saw before InBoL, like LLaVA's own instruction data."""
    n_train: int = 2000
    """InBoL training items (answerable + mismatched unanswerable): sampled for confidence, then
    used by IDK-IT / SFT / DPO. All names at equal frequency, so rare names get low confidence."""
    n_id_test: int = 400
    n_ood_test: int = 400
    """Items per OOD test set (shapes_ood_paraphrase, shapes_ood_scene)."""
    n_unanswerable_test: int = 300
    unanswerable_fraction: float = 0.15
    """Fraction of train items made unanswerable by image-question mismatch."""
    n_names: int = 24
    """Knowledge family: how many colour-shape combinations get an invented name."""
    rare_name_fraction: float = 0.5
    """Share of named combinations that are rare in training (the intrinsic boundary)."""
    rare_name_weight: float = 0.002
    """Pretrain split: sampling weight of a rare name relative to a common one."""


@dataclass
class DatasetSpec:
    name: str = ""
    """Data set name as written into the `dataset` column (e.g. vqav2, aokvqa, gqa)."""
    format: str = ""
    """Loader: vqav2 | scienceqa | oven | aokvqa | gqa | mmmu | mmbench | vizwiz | unanswerable_jsonl | items."""
    path: str = ""
    """Local path or pyarrow filesystem URI of the data set's main file or folder."""
    images: str = ""
    """Image folder (when the format keeps images apart from the annotations)."""
    split: str = "train"
    """train | id_test | ood_test | unanswerable_test."""
    limit: int = 0
    """Read at most this many rows (0 = all)."""


@dataclass
class DataConfig:
    source: Literal["shapes", "files"] = "shapes"
    """`shapes` generates ShapesWorld; `files` reads `datasets` in their published formats."""
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    datasets: list[DatasetSpec] = field(default_factory=list)
    image_storage: Literal["bytes", "path"] = "bytes"
    """Store encoded image bytes in the tables, or paths resolved lazily by each stage."""
    max_image_bytes: int = 20_000_000
    max_image_pixels: int = 40_000_000
    unanswerable_per_answerable: float = 0.15
    """Real data: unanswerable items built by image-question mismatch per answerable training item."""


@dataclass
class BaseTrainConfig:
    """The short supervised training that makes the tiny model know some things and not others."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    vision_lr_scale: float = 0.0
    """Learning-rate multiplier of the CLIP tower (0 freezes it). At the full rate the from-scratch
    tower collapsed to image-independent features in our runs; frozen random features or a slow
    tower keep colour and shape decodable while the projector and LM learn to read them."""
    seed: int = 0
    threads: int = 2


@dataclass
class GradingConfig:
    vqa_correct_at: float = 0.5
    """A vqa_soft sample counts as correct when its VQA accuracy is at least this."""


@dataclass
class SamplingConfig:
    engine: Literal["transformers", "vllm"] = "transformers"
    k: int = 10
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 8
    seed: int = 0
    batch_size: int = 32
    """Items per actor call."""
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 2048
    tensor_parallel_size: int = 1
    kv_cache_memory_bytes: int = 0
    """vLLM on CPU: explicit KV cache size (0 = let vLLM decide from memory utilisation)."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"sampling.k must be >= 1, got {self.k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class ConstructConfig:
    tau_known: float = 1.0
    """conf >= tau_known -> bucket `known`."""
    tau_unknown: float = 0.0
    """conf <= tau_unknown -> bucket `unknown`."""
    tau_idk: float = 0.5
    """IDK-IT: refuse when conf < tau_idk (answering earns 2*conf-1 in expectation, refusing 0)."""
    refusal_template: int = 0
    """Index into REFUSAL_TEMPLATES used as the training refusal (-1: rotate by item id)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.tau_unknown < self.tau_known <= 1.0:
            raise ConfigError(
                f"construct thresholds need 0 <= tau_unknown < tau_known <= 1, got "
                f"{self.tau_unknown}, {self.tau_known}"
            )


@dataclass
class TrainConfig:
    method: Literal["idk_it", "sft", "cadpo", "dpo1", "dpo2", "dpo3"] = "cadpo"
    num_workers: int = 0
    """Ray Train workers; 0 runs the loop in the driver (local mode)."""
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
    train_projector: bool = False
    epochs: int = 1
    max_steps: int = 0
    """0 = one pass over `epochs`."""
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    beta: float = 0.1
    """DPO temperature."""
    sft_weight: float = 0.0
    """Optional NLL on the chosen response added to DPO losses (0 = pure DPO)."""
    checkpoint_every: int = 50
    num_to_keep: int = 2
    max_failures: int = 1
    logprob_chunk_size: int = 1024
    seed: int = 0
    dpo_lr: float = 0.0
    """Learning rate of the DPO methods (0 = `lr`): DPO usually wants a much smaller one than IDK-IT/SFT."""
    dpo_init: Literal["idk_it", "base"] = "idk_it"
    """What CA-DPO and the DPO ablations start from (and use as their frozen reference): the IDK-IT model
    (InBoL's two steps: IDK-IT teaches the model to say a refusal, CA-DPO then places it by confidence) or
    the base model."""
    merge: bool = True
    """Also save a merged HF checkpoint (loadable by from_pretrained and vLLM)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping; the norm is logged either way)."""
    cpus_per_worker: float = 1.0
    """Ray Train workers' (and reference scorers') CPU reservation; torch threads = max(1, int(this)).
    Leave CPUs for Ray Data: 2 workers on a 2-CPU Ray need < 1 each."""
    tensorboard: bool = False
    """Also write per-step scalars to `<model out dir>/tensorboard` (metrics.jsonl is always written)."""


@dataclass
class EvalConfig:
    datasets: list[str] = field(default_factory=list)
    """Eval set names (empty: every non-train split in `items`)."""
    methods: list[str] = field(
        default_factory=lambda: ["base", "refusal_prompt", "sft", "idk_it", "dpo1", "dpo2", "dpo3", "cadpo"]
    )
    refusal_instruction: str = (
        "Answer the question using a single word or phrase. If you are not sure, answer: I don't know."
    )
    """The `refusal_prompt` baseline's instruction (appended after the question, replacing
    `answer_instruction`): the base model, asked to refuse when unsure."""
    answer_instruction: str = ""
    """Instruction appended after the question for every other method ("" = the question alone, as
    the tiny model was trained). LLaVA-1.5 evaluates short answers with "Answer the question using a
    single word or phrase."; the refusal baseline then differs from `base` only by its refusal clause."""
    max_new_tokens: int = 8
    batch_size: int = 64
    conf_bins: int = 5
    bootstrap_samples: int = 1000


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0
    max_ongoing_requests: int = 16
    max_image_bytes: int = 10_000_000
    confidence_k: int = 10
    max_batch_size: int = 8
    """Greedy requests a model replica answers in one `generate` call (Serve dynamic batching), so
    concurrent users share a forward pass instead of queueing one by one."""
    batch_wait_timeout_s: float = 0.01
    """How long a replica waits to fill a batch: at most this is added to a lone user's latency."""
    upscale_delay_s: float = 30.0
    """Serve autoscaling: how long load must stay above `target_ongoing_requests` before a replica is
    added (Serve's default; tests and the benchmark shorten it to see 1 -> 2 replicas in seconds)."""


@dataclass
class RayConfig:
    address: str = ""
    """Empty: start a local Ray with `num_cpus`; otherwise connect (e.g. `auto`)."""
    num_cpus: int = 2
    temp_dir: str = ""


@dataclass
class Config:
    run_dir: str = "runs/tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    base_train: BaseTrainConfig = field(default_factory=BaseTrainConfig)
    grading: GradingConfig = field(default_factory=GradingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    construct: ConstructConfig = field(default_factory=ConstructConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Content hash of the named sections, so a stage reruns exactly when its inputs' config changes."""
        blob = json.dumps({s: dataclasses.asdict(getattr(self, s)) for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- building dataclasses from plain data -------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and minimally coerce) one value against a field type; raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping for section {tp.__name__}, got {type(value).__name__}"
            )
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, typing.List):  # noqa: UP006
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} ({value!r})")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool, got {type(value).__name__} ({value!r})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected int, got {type(value).__name__} ({value!r})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {type(value).__name__} ({value!r})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {type(value).__name__} ({value!r})")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown config key '{dotted}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """CLI values are YAML scalars, so `train.lr=1e-5`, `train.lora=false` and `x=[a, b]` all work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse override value {text!r}: {exc}") from exc


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: '{part}' is not a section")
        node[parts[-1]] = _parse_scalar(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults) and apply `section.key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: invalid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        data = loaded or {}
    data = apply_overrides(data, list(overrides or []))
    return _build(Config, data)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
