"""The confidence-sampling stage: `items` (train split) -> `samples` (K graded responses, conf) + quarantine.

A thin user of the one generate-over-items stage (`inbol_ray.generation.stage`): K samples per item at
`sampling.temperature` / `top_p` from the run's base model, graded into `samples` rows. Sample j of item i
depends only on (`sampling.seed`, item id, j), the model and the decoding settings (DESIGN.md 1.6), so the
table is the same whatever the actor count, batch size or shard size. Buckets are not stored: construct
computes them from conf, and a change of `construct.*` never throws samples away.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from inbol_ray.config import Config
from inbol_ray.generation.actor import Decoding
from inbol_ray.generation.grade import SAMPLES
from inbol_ray.generation.shards import Selection
from inbol_ray.generation.stage import EXIT_ONCE_ENV, SHARD_ROWS, GenerationResult, Job, run_generation
from inbol_ray.run_layout import RunLayout

STAGE_NAME = "sample"
SamplingResult = GenerationResult
__all__ = ["EXIT_ONCE_ENV", "SHARD_ROWS", "STAGE_NAME", "SamplingResult", "run_sampling", "sampling_job"]


def sampling_job(
    cfg: Config,
    layout: RunLayout,
    *,
    items_uri: str | None = None,
    out_uri: str | None = None,
    split: str | None = "train",
    datasets: Sequence[str] | None = None,
    shard_rows: int = SHARD_ROWS,
    model: str | None = None,
) -> Job:
    return Job(
        stage=STAGE_NAME,
        items_uri=items_uri or layout.items,
        out_uri=out_uri or layout.samples,
        quarantine_uri=layout.quarantine(STAGE_NAME),
        model_dir=model or layout.base_model,
        decoding=Decoding.sampled(cfg.sampling),
        output=SAMPLES,
        selection=Selection(
            splits=(split,) if split else None, datasets=tuple(sorted(datasets)) if datasets else None
        ),
        shard_rows=shard_rows,
    )


def run_sampling(
    cfg: Config,
    layout: RunLayout,
    *,
    log: Callable[[str], None] = print,
    exit_once_marker: str | None = None,
    **selection: Any,
) -> GenerationResult:
    """Sample `layout.base_model` (or `model`) on the `split` items into `layout.samples` (Ray must be up).

    `selection`: the keyword arguments of `sampling_job` (items_uri, out_uri, split, datasets, shard_rows,
    model). Finished shards of an earlier run with the same plan are kept. `exit_once_marker`: test hook
    (kill one actor once, see `GenerateActor`).
    """
    return run_generation(
        cfg, sampling_job(cfg, layout, **selection), log=log, exit_once_marker=exit_once_marker
    )
