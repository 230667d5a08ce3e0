"""Session-wide fixtures: one local Ray per test session, one tiny checkpoint per session.

Both are expensive (Ray ~5 s to start, the checkpoint a few seconds) and read-only for tests, so they are
built once; tests that need a trained model build their own small one from `tiny_checkpoint`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inbol_ray.runtime import quiet_env

quiet_env()


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory):
    """A real local Ray on 2 CPUs bound to 127.0.0.1, shut down at the end of the session."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    temp_dir = Path("/tmp") / f"inbol_ray_test_{os.getpid()}"
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        logging_level="WARNING",
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


SMOKE = [
    "data.shapes.n_pretrain=200",
    "data.shapes.n_train=64",
    "data.shapes.n_val=16",
    "data.shapes.n_id_test=16",
    "data.shapes.n_ood_test=16",
    "data.shapes.n_unanswerable_test=16",
    "base_train.steps=30",
    "sampling.k=3",
    "sampling.batch_size=16",
    "train.max_steps=2",
    "train.batch_size=16",
    "eval.batch_size=32",
    "train.num_workers=0",
]
"""The embedded default at smoke size: a few hundred items, a few steps per training (local-mode Ray Train)."""


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One run directory of the embedded default at smoke size, and its overrides: the pipeline test runs
    every stage in it, the rehearsal test starts from its prepare and base model (whichever runs first
    makes them, the other finds them up to date)."""
    return tmp_path_factory.mktemp("smoke") / "run", list(SMOKE)


@pytest.fixture(scope="session")
def tiny_config():
    """The embedded default config, shrunk to smoke size for tests."""
    from inbol_ray.config import load_config

    return load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_config) -> Path:
    """An untrained tiny LLaVA checkpoint (real HF directory), built once per session."""
    from inbol_ray.model.tiny import build_tiny_checkpoint

    out = tmp_path_factory.mktemp("tiny_ckpt") / "model"
    build_tiny_checkpoint(out, tiny_config.model)
    return out
