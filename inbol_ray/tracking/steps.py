"""Per-step training metrics from the loop's rank 0 into the training's run.

Ray Train workers are separate processes: what they need travels in the `LoopSpec` as a `RunTarget`
(plain, picklable). Only rank 0 opens a sink, after the step's metrics were all-reduced, so each step is
logged once whatever the worker count. A worker group restarted after a failure logs the steps it redoes
again at the same step numbers (MLflow keeps both points, W&B drops a step it has seen);
`metrics.jsonl`, written by the driver from the checkpointed history, holds each step once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inbol_ray.tracking.guard import Guard
from inbol_ray.tracking.params import step_metrics


@dataclass(frozen=True)
class RunTarget:
    """Where a training's steps go: the backend, its location, and the run the driver prepared."""

    backend: str
    uri: str
    project: str
    run_id: str
    name: str
    session: str
    """The pipeline run's key: a failure here turns tracking off for it (in this process)."""
    group: str = ""
    tags: tuple[str, ...] = ()
    """`key=value` strings."""
    params: tuple[tuple[str, Any], ...] = ()
    """The training's parameters: W&B's run is opened by rank 0, which sets them as its config."""


def _sink(target: RunTarget):
    if target.backend == "mlflow":
        from inbol_ray.tracking.mlflow_backend import MlflowSink

        return MlflowSink(target.uri, target.run_id)
    from inbol_ray.tracking.wandb_backend import WandbSink

    return WandbSink(target)


class StepLogger:
    """No-op unless given a target on rank 0; every call guarded (a tracker never fails training)."""

    def __init__(self, target: RunTarget | None, rank: int) -> None:
        self.sink = None
        if target is None or rank != 0:
            return
        self.guard = Guard(target.session, f"{target.backend} at {target.uri or 'its default location'}")
        self.sink = self.guard(f"opening the {target.name} training's run", _sink, target)

    def log(self, row: Mapping[str, Any]) -> None:
        if self.sink is not None:
            self.guard(f"logging step {row['step']}", self.sink.log, step_metrics(row), int(row["step"]))

    def close(self, ok: bool) -> None:
        if self.sink is not None:
            self.guard("closing the training's run", self.sink.close, ok)
            self.sink = None
