"""Weights & Biases: W&B has no nested runs, so the pipeline run is a *group*.

The parent, each stage and each training are W&B runs in one group (`<run name>-<id>`), told apart by
`job_type` (pipeline / stage / method). Every run is its own `wandb.init(reinit="create_new")` (W&B >=
0.19.10): several runs open in one process, as concurrent stages need. Output is silenced and console
capture off: the pipeline prints its own lines, and Ray's workers own their stdout.

A training's run is opened by the training loop's rank 0 through Ray's `setup_wandb`
(`ray.air.integrations.wandb`, Ray 2.60), with the id the driver chose; the driver never opens it, because
two processes writing one W&B run need W&B's shared mode, and offline it would become two run folders.
`setup_wandb(rank_zero_only=True)` cannot be relied on under Ray Train V2 (Ray 2.60's default): it reads
the V1 train session, which V2 never sets, so every worker would open a run; the loop calls it on rank 0
only, with `rank_zero_only=False`. `WANDB_MODE=offline` writes `<WANDB_DIR>/wandb/offline-run-*` folders
for `wandb sync`; set WANDB_* variables before Ray starts so workers inherit them.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from inbol_ray.config.sections import TrackingConfig


def settings(base_url: str):
    import wandb

    return wandb.Settings(silent=True, console="off", **({"base_url": base_url} if base_url else {}))


def tag_list(tags: Mapping[str, str] | Sequence[str]) -> list[str]:
    """W&B tags are plain strings (at most 64 characters): `key=value`."""
    pairs = [f"{k}={v}" for k, v in tags.items()] if isinstance(tags, Mapping) else list(tags)
    return [t[:64] for t in pairs]


def _artifact_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "files"


class WandbBackend:
    """The driver's side: runs are `wandb` Run objects; a child is a run in the parent's group."""

    name = "wandb"

    def __init__(self, tracking: TrackingConfig) -> None:
        import wandb

        self.wandb = wandb
        self.project = tracking.project
        self.uri = tracking.uri
        """The W&B server's base URL ("" = $WANDB_BASE_URL or W&B's default)."""

    def start(self, name: str, kind: str, parent: Any, tags: Mapping[str, str], params: Mapping[str, Any]):
        group = parent.group if parent is not None else f"{name}-{uuid.uuid4().hex[:8]}"
        return self.wandb.init(
            project=self.project,
            name=name,
            group=group,
            job_type=kind,
            tags=tag_list(tags),
            config=dict(params),
            reinit="create_new",
            settings=settings(self.uri),
        )

    def prepare_method(
        self, name: str, parent: Any, tags: Mapping[str, str], params: Mapping[str, Any]
    ) -> tuple[None, str, str]:
        """(no driver handle, the run id rank 0 will open, the group): see the module's docstring."""
        return None, uuid.uuid4().hex[:12], parent.group

    def log_params(self, run: Any, params: Mapping[str, Any]) -> None:
        run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, run: Any, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Values of a step go to the run's history; values without one (counts, evaluation) to its summary."""
        if step is None:
            run.summary.update(dict(metrics))
        else:
            run.log(dict(metrics), step=step)

    def log_files(self, run: Any, files: Mapping[str, str]) -> None:
        artifact = self.wandb.Artifact(_artifact_name(f"{run.group}-{run.name}"), type="run-files")
        for path, local in files.items():
            artifact.add_file(local, name=path)
        run.log_artifact(artifact)

    def finish(self, run: Any, ok: bool) -> None:
        run.finish(exit_code=0 if ok else 1)

    def link(self, run: Any) -> str:
        if run.offline:  # (asking an offline run for its URL prints a warning)
            return f"{run.dir} (offline: `wandb sync` uploads it)"
        return run.url or run.dir


class WandbSink:
    """A training worker's side (rank 0): opens the training's run by the id the driver chose."""

    def __init__(self, target) -> None:
        from ray.air.integrations.wandb import setup_wandb

        self.run = setup_wandb(
            config=dict(target.params),
            rank_zero_only=False,  # the loop calls this on rank 0 only (see the module's docstring)
            project=target.project,
            id=target.run_id,
            name=target.name,
            group=target.group,
            job_type="method",
            tags=tag_list(target.tags),
            resume="allow",  # a restarted worker group continues the same run
            reinit="create_new",
            settings=settings(target.uri),
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)
