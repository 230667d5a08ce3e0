"""The prepare stage: data sets in their published formats (or ShapesWorld) -> `items` + `quarantine`.

Three steps, split by where they run:
1. `input_problems` and 2. `read_sources` (driver, no Ray; in `inbol_ray.data.prepare_sources`, re-exported
   here): check every configured path, then parse the data sets (streamed, bounded memory), check ids
   unique, add the mismatched unanswerable training rows, and stage everything as Parquet parts.
3. `run_prepare` (Ray Data): a CPU `map_batches` stage over the staged parts opens every image (bytes in
   the row, or the file at `image_path`), validates it (decodable, within `data.max_image_bytes` /
   `data.max_image_pixels`), stores bytes or keeps the path (`data.image_storage`), and tags bad rows with a
   reason (`images.check_images`). Good rows are written to the run layout's `items` (Parquet shards), bad
   rows plus the loaders' rows to its `quarantine("prepare")`, a batch at a time.

Invariant, checked per data set after writing: rows read = rows in `items` + rows quarantined + rows left
out of a `sample_rows` subset.
With `image_storage: path`, rows whose format embeds images (MMMU, MMBench) keep their bytes: there is no
file to point at.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from inbol_ray.config import Config
from inbol_ray.data import io as dio
from inbol_ray.data.images import check_images
from inbol_ray.data.mismatch import summary as mismatch_summary
from inbol_ray.data.prepare_sources import (
    STAGE_NAME,
    Sources,
    first_rows,
    input_problems,
    positions,
    read_sources,
    shapes_items,
    staging_root,
)
from inbol_ray.run_layout import RunLayout
from inbol_ray.schema import DATASET, ID, ITEMS, QUARANTINE, REASON, ROW_KEY, SOURCE, STAGE, conform

__all__ = [
    "STAGE_NAME",
    "PrepareResult",
    "Sources",
    "input_problems",
    "read_sources",
    "run_prepare",
    "shapes_items",
    "staging_root",
]


@dataclass
class PrepareResult:
    items_uri: str
    quarantine_uri: str
    counts: dict[str, dict[str, int]]
    """Per data set: `read` (input rows), `items` (written), `quarantined`, and `not_sampled` (usable rows
    left out of its `sample_rows` subset) where it has one. Mismatched rows are data sets
    `<name>_mismatch`: their `read` is what was built, so the check read = items + quarantined covers them."""
    mismatch: dict[str, int] = field(default_factory=dict)
    """`Sources.mismatch`: how many mismatched rows were wanted and built, and why any were not."""

    def summary_line(self) -> str:
        parts = [
            f"{name} {c['items']}/{c['read']}"
            + (f" ({c['not_sampled']} not sampled)" if c.get("not_sampled") else "")
            for name, c in sorted(self.counts.items())
        ]
        total = sum(c["items"] for c in self.counts.values())
        bad = sum(c["quarantined"] for c in self.counts.values())
        line = f"prepare: items {total}, quarantined {bad} | " + ", ".join(parts) + " (items/read)"
        return line + (f" | {mismatch_summary(self.mismatch)}" if self.mismatch else "")


# --- the Ray Data stage ---------------------------------------------------------------------------------


def _check_staged(batch: pa.Table, repeated: pa.Array, **limits: Any) -> pa.Table:
    """Ray Data UDF: staged rows in, checked ITEMS rows + `reason` out; repeated ids were quarantined by
    `read_sources` already, so they are dropped here without opening their images."""
    if len(repeated):
        batch = batch.filter(first_rows(batch, repeated))
    return check_images(batch.select(ITEMS.names).cast(ITEMS), **limits)


def _good_rows(batch: pa.Table) -> pa.Table:
    mask = pc.is_null(batch[REASON])
    return batch.filter(mask).select(ITEMS.names).cast(ITEMS)


def _bad_rows(batch: pa.Table) -> pa.Table:
    bad = batch.filter(pc.is_valid(batch[REASON]))
    return pa.table({SOURCE: bad[SOURCE], ROW_KEY: bad[ID], REASON: bad[REASON], DATASET: bad[DATASET]})


def run_prepare(
    cfg: Config,
    layout: RunLayout,
    sources: Sources | None = None,
    *,
    batch_size: int = 16,
    rows_per_block: int = 256,
) -> PrepareResult:
    """Run the stage (Ray must be initialised); overwrite `layout.items` and the stage's quarantine.

    `sources`: already parsed input (default: `read_sources(cfg)` into the layout's staging folder, which
    is removed once the stage has written its tables).

    `batch_size` is small because a batch holds its rows' encoded images (and one decoded image at a time);
    `rows_per_block` sets how many tasks the image stage fans out to. The checked data set is materialised
    once so images are read and decoded once; Ray spills it to disk when it outgrows the object store.
    """
    import ray

    sources = sources if sources is not None else read_sources(cfg, staging_root(layout))
    items_uri = layout.items
    dio.remove(items_uri)
    rejected = [sources.quarantine_parts]
    if dio.exists(sources.items_parts):
        data = cfg.data
        fs, staged = dio.resolve(sources.items_parts)
        checked = (
            ray.data.read_parquet(staged, filesystem=fs)
            .repartition(target_num_rows_per_block=rows_per_block)
            .map_batches(
                _check_staged,
                batch_format="pyarrow",
                batch_size=batch_size,
                fn_kwargs={
                    "repeated": positions(sources.duplicates),
                    "storage": data.image_storage,
                    "max_bytes": data.max_image_bytes,
                    "max_pixels": data.max_image_pixels,
                },
            )
            .materialize()  # read and decode every image once, then split into good and bad
        )
        fs, path = dio.resolve(items_uri)
        checked.map_batches(_good_rows, batch_format="pyarrow", batch_size=None).write_parquet(
            path, filesystem=fs
        )
        bad_uri = dio.join(sources.root, "checked_bad")
        fs, path = dio.resolve(bad_uri)
        checked.map_batches(_bad_rows, batch_format="pyarrow", batch_size=None).write_parquet(
            path, filesystem=fs
        )
        rejected.append(bad_uri)
    if not dio.exists(items_uri) or not dio.list_files(items_uri, suffix=".parquet"):
        dio.write_table(ITEMS.empty_table(), dio.join(items_uri, "empty.parquet"))
    quarantine_uri = layout.quarantine(STAGE_NAME)
    quarantined = _write_quarantine(rejected, quarantine_uri)
    counts = _counts(sources.read, quarantined, _dataset_counts(items_uri), sources.not_sampled)
    dio.remove(sources.root)  # the staged text repeats the items: keep no second copy
    if dio.exists(parent := dio.parent(sources.root)) and not dio.list_files(parent):
        dio.remove(parent)  # an empty `staging` folder says nothing
    return PrepareResult(items_uri, quarantine_uri, counts, dict(sources.mismatch))


def _dataset_counts(uri: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for batch in dio.iter_batches(uri, columns=[DATASET]):
        counts.update(batch[DATASET].to_pylist())
    return counts


def _write_quarantine(parts: list[str], uri: str) -> Counter[str]:
    """The stage's quarantine file from the staged rejects, a batch at a time; per data set counts."""
    counts: Counter[str] = Counter()
    dio.remove(uri)
    with dio.TableFile(uri, QUARANTINE) as out:
        for folder in filter(dio.exists, parts):  # Ray Data writes no folder for no rows
            for batch in dio.iter_batches(folder):
                counts.update(batch[DATASET].to_pylist())
                stage = pa.array([STAGE_NAME] * batch.num_rows, pa.string())
                table = pa.Table.from_batches([batch]).append_column(STAGE, stage)
                out.write(conform(table, QUARANTINE, f"quarantine of stage {STAGE_NAME}"))
    return counts


def _counts(
    read: dict[str, int],
    quarantined: Counter[str],
    kept: Counter[str],
    not_sampled: dict[str, int] | None = None,
) -> dict[str, dict[str, int]]:
    """Per-data-set counts, and the no-silent-loss check: read == written + quarantined + not sampled."""
    counts = {}
    skipped = not_sampled or {}
    for name in sorted(set(read) | set(kept) | set(quarantined)):
        counts[name] = {"read": read.get(name, 0), "items": kept[name], "quarantined": quarantined[name]}
        if skipped.get(name):
            counts[name]["not_sampled"] = skipped[name]
        if counts[name]["read"] != kept[name] + quarantined[name] + skipped.get(name, 0):
            raise RuntimeError(
                f"prepare lost rows of {name}: {counts[name]} (read != items + quarantined + not_sampled)"
            )
    return counts
