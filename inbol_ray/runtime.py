"""Process environment shared by jobs, tests and Serve: no telemetry, loopback-only Ray, the checkpoint cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inbol_ray.config import CheckpointConfig, RayConfig

# Ray Train's controller polls its workers every 2 s by default, and each phase of a training (group started,
# each report, done) waits for the next poll: measured here, 0.25 s takes 3-5 s off every training (a 2-step
# full fine-tune 22.0 -> 18.6 s, a 2-worker FSDP run 27.3 -> 22.2 s). Ray Train hands the driver's value to
# its controller and workers, so it holds on a cluster too; a user's own value wins.
RAY_TRAIN_POLL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# No HF_HUB_OFFLINE here: a model named by Hub id resolves through huggingface_hub as in the user's own
# scripts (inbol_ray/hub.py), and offline mode is the user's choice; local folders never reach the Hub.
_QUIET = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DATA_DISABLE_PROGRESS_BARS": os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0"),
    RAY_TRAIN_POLL[0]: RAY_TRAIN_POLL[1],
}


def quiet_env() -> None:
    """Set telemetry (and Ray Train polling) variables unless the user already set them (their choice
    wins)."""
    for key, value in _QUIET.items():
        os.environ.setdefault(key, value)


def configure_checkpoint_cache(checkpoint: CheckpointConfig) -> None:
    """`checkpoint.*` into this process's environment, before Ray starts: local Ray workers inherit it, and
    every reader of the cache (checkpoint_cache.local_dir) reads it there. Cluster workers and Serve replicas
    read the same variables from the manifests' runtime_env (cluster/*.yaml)."""
    from inbol_ray.checkpoint_cache import configure

    configure(checkpoint.cache_dir, checkpoint.cache_bytes)


def init_ray(
    address: str = "", num_cpus: int = 2, temp_dir: str = "", checkpoint: CheckpointConfig | None = None
) -> bool:
    """Connect to `address` or start a local Ray with explicit CPUs; return True when we started it.

    The caller shuts down only what it started (a job submitted to a cluster must not stop the cluster).
    `checkpoint` (the config's section) sets up the checkpoint cache first, so the workers see it.
    """
    import ray

    quiet_env()
    if checkpoint is not None:
        configure_checkpoint_cache(checkpoint)
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level="WARNING")
        return False
    kwargs = {"num_cpus": num_cpus, "include_dashboard": False, "logging_level": "WARNING"}
    if temp_dir:
        kwargs["_temp_dir"] = temp_dir
    ray.init(**kwargs)
    return True


@contextmanager
def ray_session(ray_cfg: RayConfig, checkpoint: CheckpointConfig | None = None) -> Iterator[None]:
    """`with ray_session(cfg.ray, cfg.checkpoint):` what every job wraps its stage in: connect or start, and
    on the way out shut down only a Ray this job started (a job submitted to a cluster must leave the
    cluster up)."""
    started = init_ray(ray_cfg.address, ray_cfg.num_cpus, ray_cfg.temp_dir, checkpoint)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
