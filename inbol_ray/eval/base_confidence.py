"""The base model's confidence on the evaluation items: the x-axis of the intrinsic-boundary figures.

The sampling stage measures conf on the training split, but the paper's analysis (section 4.3) bins the
*test* items by the base model's confidence and asks, per method, how often it refuses and how often it
is right when it answers, bin by bin. So this runs the very same generation stage as confidence sampling
(`inbol_ray.generation.stage`: same `Sampler`, K = `sampling.k` samples at `sampling.temperature` /
`top_p` / `max_new_tokens`, per-item seeds, the same grading) on the answerable evaluation sets, so conf
means the same on training and test items. Output: a `samples` table (schema.SAMPLES, shards) at
`layout.base_confidence`, reused on rerun while the checkpoint, settings and items are unchanged.

Any other `samples`-layout table can stand in (for example one a user made earlier): `read_confidence`
needs only its `id` and `conf` columns.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from inbol_ray import schema as S
from inbol_ray.config import Config
from inbol_ray.data import io as dio
from inbol_ray.generation.actor import Decoding
from inbol_ray.generation.grade import SAMPLES
from inbol_ray.generation.shards import Selection
from inbol_ray.generation.stage import Job, run_generation
from inbol_ray.run_layout import RunLayout

STAGE_NAME = "base_confidence"
ANSWERABLE_SPLITS = ("id_test", "ood_test")
"""Splits whose items the figures bin: unanswerable sets have conf 0 by definition and measure the
extrinsic boundary, which the report's refusal-rate table covers; sampling them would be wasted."""


def compute_base_confidence(cfg: Config, layout: RunLayout, *, log: Callable[[str], None] = print) -> str:
    """K graded samples from `layout.base_model` per answerable item of the in-domain and OOD evaluation
    sets (`cfg.eval.datasets` when set); returns the folder of `samples` shards. Ray must be initialised."""
    datasets = tuple(sorted(cfg.eval.datasets)) if cfg.eval.datasets else None
    job = Job(
        stage=STAGE_NAME,
        items_uri=layout.items,
        out_uri=layout.base_confidence,
        quarantine_uri=layout.quarantine(STAGE_NAME),
        model_dir=layout.base_model,
        decoding=Decoding.sampled(cfg.sampling),
        output=SAMPLES,
        selection=Selection(splits=ANSWERABLE_SPLITS, datasets=datasets, answerable_only=True),
    )
    result = run_generation(cfg, job, log=log)
    log(f"  base confidence: {result.summary_line()}")
    return result.out_uri


def read_confidence(uri: str) -> pd.DataFrame:
    """`id` and `conf` from a samples-layout table (a file, or a folder of shards).

    Extra rows (sets evaluated in an earlier run) do no harm: the report joins on the ids it plots.
    """
    return dio.read_table(uri, columns=[S.ID, S.CONF]).to_pandas()
