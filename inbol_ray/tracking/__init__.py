"""Experiment tracking (`tracking` config section): MLflow or W&B, off by default.

    open_tracking(cfg, layout, hashes) -> Tracking    one per run_pipeline call (session.py)
    Tracking.stage / skipped / start_method / end_method / close
    StepLogger(target, rank)                           the training loop's rank 0 (steps.py)

Why a copy in a tracker at all: sweeps are compared, and long runs watched, in the tools users already
have; the run directory stays the record (manifests, metrics.jsonl, metrics.parquet, report.md), and a
tracker that fails never fails a stage (guard.py). Clients are imported only when a backend is on:
`pip install 'inbol-ray[tracking]'`.
"""

from inbol_ray.tracking.guard import TrackingWarning
from inbol_ray.tracking.session import Tracking, open_tracking
from inbol_ray.tracking.steps import RunTarget, StepLogger

__all__ = ["RunTarget", "StepLogger", "Tracking", "TrackingWarning", "open_tracking"]
