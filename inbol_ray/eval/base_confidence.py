"""The base model's confidence on the evaluation items: the x-axis of the intrinsic-boundary figures.

The sampling stage measures conf on the training split, but the paper's analysis (section 4.3) bins the
*test* items by the base model's confidence and asks, per method, how often it refuses and how often it
is right when it answers, bin by bin. So this samples the base checkpoint on the answerable evaluation
sets with the sampling stage's settings and code: the same `Sampler` (engine `sampling.engine`), K =
`sampling.k` samples at `sampling.temperature` / `top_p` / `max_new_tokens`, seeds from `batch_seed`, and
the same grading (`grade_samples_batch`) - so conf means the same on training and test items. Output: a
`samples` table (schema.SAMPLES) per data set in `<run_dir>/eval/base_confidence/`, reused on rerun
while the checkpoint, settings and items are unchanged.

Why not call the sampling stage itself: its Ray Data pipeline starts the actor pool while its read tasks
are still queued, and with every CPU given to actors (tiny.yaml: 2 actors x 1 CPU on 2 cores) the read
can starve; the evaluation pipeline reads and materialises the items before any actor starts.

Any other `samples`-layout table can stand in (for example one a user made earlier): `read_confidence`
needs only its `id` and `conf` columns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from inbol_ray import schema as S
from inbol_ray.boundary import grade_samples_batch
from inbol_ray.config import Config
from inbol_ray.data import io as dio
from inbol_ray.eval.evaluate import (
    EVAL_DIR,
    Decoding,
    eval_items,
    fingerprint,
    read_inputs,
    shard_is_current,
    stream_responses,
    write_shard,
)

CONFIDENCE_DIR = "base_confidence"
ANSWERABLE_SPLITS = ("id_test", "ood_test")
"""Splits whose items the figures bin: unanswerable sets have conf 0 by definition and measure the
extrinsic boundary, which the report's refusal-rate table covers; sampling them would be wasted."""


def confidence_uri(run_dir: str) -> str:
    """Where `compute_base_confidence` writes, and where the report looks by default."""
    return dio.join(dio.absolute(run_dir), EVAL_DIR, CONFIDENCE_DIR)


def sampling_decoding(cfg: Config) -> Decoding:
    """The sampling stage's decoding (no instruction: it samples the bare question, as for training)."""
    s = cfg.sampling
    return Decoding(None, s.max_new_tokens, k=s.k, temperature=s.temperature, top_p=s.top_p, seed=s.seed)


def compute_base_confidence(
    cfg: Config,
    run_dir: str,
    base_dir: str,
    items_uri: str,
    datasets: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """K graded samples from the base checkpoint per answerable item of the in-domain and OOD evaluation
    sets; returns the folder of `samples` shards. Ray must be initialised."""
    out = confidence_uri(run_dir)
    text = eval_items(items_uri, datasets or cfg.eval.datasets or None)
    text = text.filter(
        pc.and_(pc.is_in(text[S.SPLIT], value_set=pa.array(ANSWERABLE_SPLITS)), text[S.ANSWERABLE])
    )
    text_df = text.to_pandas()
    ids_by_set = {d: g[S.ID].tolist() for d, g in text_df.groupby(S.DATASET, sort=True)}
    decoding = sampling_decoding(cfg)
    settings = {**asdict(decoding), "engine": cfg.sampling.engine, "dtype": cfg.model.dtype,
                "grading": asdict(cfg.grading), "construct": asdict(cfg.construct)}  # fmt: skip
    fps = {d: fingerprint(base_dir, ids, **settings) for d, ids in ids_by_set.items()}
    todo = [d for d in ids_by_set if not shard_is_current(out, d, fps[d])]
    if not todo:
        log(f"  base confidence: {len(ids_by_set)} set(s) up to date")
        return out
    log(f"  base confidence: K={decoding.k} samples per item on {', '.join(todo)}")
    n_rows = sum(len(ids_by_set[d]) for d in todo)
    blocks = max(cfg.sampling.num_actors, -(-n_rows // cfg.sampling.batch_size))
    source = read_inputs(items_uri, [i for d in todo for i in ids_by_set[d]], blocks)
    expected = {d: len(ids_by_set[d]) for d in todo}
    stream = stream_responses(
        source,
        expected,
        base_dir,
        cfg.sampling,
        decoding,
        batch_size=cfg.sampling.batch_size,
        dtype=cfg.model.dtype,
    )
    for dataset, responses in stream:
        rows = responses.merge(text_df, on=[S.DATASET, S.ID], how="left", validate="one_to_one")
        samples = grade_samples_batch(rows, cfg.grading, cfg.construct).sort_values(S.ID, ignore_index=True)
        table = S.conform(pa.Table.from_pandas(samples, preserve_index=False), S.SAMPLES, "base confidence")
        write_shard(table, out, dataset, fps[dataset])
        log(f"    {dataset:<28} n={len(samples):<5} mean conf={samples[S.CONF].mean():.2f}")
    return out


def read_confidence(uri: str) -> pd.DataFrame:
    """`id` and `conf` from a samples-layout table (a file, or a folder of shards).

    Extra rows (sets evaluated in an earlier run) do no harm: the report joins on the ids it plots.
    """
    return dio.read_table(uri, columns=[S.ID, S.CONF]).to_pandas()
