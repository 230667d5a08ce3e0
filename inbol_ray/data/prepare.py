"""The prepare stage: data sets in their published formats (or ShapesWorld) -> `items` + `quarantine`.

Three steps, split by where they run:
1. `input_problems` (driver, no Ray): every configured path exists, so a typo fails in a second.
2. `read_sources` (driver, no Ray): the loaders parse annotation files into item rows. Only text is parsed
   here; a file in the wrong format raises `DataFormatError` before any Ray work. With
   `data.unanswerable_per_answerable` > 0 it then adds mismatched unanswerable training rows (a training
   question on another training image, `inbol_ray.data.mismatch`) as data sets `<name>_mismatch`; they
   reuse an existing image's bytes or path, so step 3 checks them like any row.
3. `run_prepare` (Ray Data): a CPU `map_batches` stage opens every image (bytes in the row, or the file at
   `image_path`), validates it (decodable, within `data.max_image_bytes` / `data.max_image_pixels`), stores
   bytes or keeps the path (`data.image_storage`), and tags bad rows with a reason (`images.check_images`).
   Good rows are written to the run layout's `items` (Parquet shards), bad rows plus the loaders' rows to
   its `quarantine("prepare")`.

Invariant, checked per data set after writing: rows read = rows in `items` + rows quarantined.
With `image_storage: path`, rows whose format embeds images (MMMU, MMBench) keep their bytes: there is no
file to point at.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from inbol_ray.config import Config, DataConfig
from inbol_ray.data import io as dio
from inbol_ray.data.images import check_images
from inbol_ray.data.loaders import items_table, load, spec_problems
from inbol_ray.data.mismatch import build_mismatches
from inbol_ray.data.mismatch import summary as mismatch_summary
from inbol_ray.run_layout import RunLayout
from inbol_ray.schema import DATASET, ID, ITEMS, REASON, ROW_KEY, SOURCE, conform

STAGE_NAME = "prepare"
_BAD_COLUMNS = [ID, DATASET, SOURCE, REASON]


@dataclass
class Sources:
    """Parsed input of the stage: item rows still to be image-checked, and rows the loaders rejected."""

    items: pa.Table
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    mismatch: dict[str, int] = field(default_factory=dict)
    """Counts of the mismatched rows (`MismatchResult.counts`: wanted, built, short, why); empty when none
    were asked for."""


@dataclass
class PrepareResult:
    items_uri: str
    quarantine_uri: str
    counts: dict[str, dict[str, int]]
    """Per data set: `read` (input rows), `items` (written), `quarantined`. Mismatched rows are data sets
    `<name>_mismatch`: their `read` is what was built, so the check read = items + quarantined covers them."""
    mismatch: dict[str, int] = field(default_factory=dict)
    """`Sources.mismatch`: how many mismatched rows were wanted and built, and why any were not."""

    def summary_line(self) -> str:
        parts = [f"{name} {c['items']}/{c['read']}" for name, c in sorted(self.counts.items())]
        total = sum(c["items"] for c in self.counts.values())
        bad = sum(c["quarantined"] for c in self.counts.values())
        line = f"prepare: items {total}, quarantined {bad} | " + ", ".join(parts) + " (items/read)"
        return line + (f" | {mismatch_summary(self.mismatch)}" if self.mismatch else "")


def input_problems(data: DataConfig) -> list[str]:
    """One line per missing or misconfigured input; empty when the stage can start."""
    if data.source == "shapes":
        return []
    if not data.datasets:
        return ["data.datasets is empty (data.source is 'files')"]
    problems = []
    names = Counter(spec.name for spec in data.datasets)
    for i, spec in enumerate(data.datasets):
        problems += [f"data.datasets[{i}] {line}" for line in spec_problems(spec)]
        if spec.name and names[spec.name] > 1:
            problems.append(f"data.datasets[{i}] {spec.name}: name used by {names[spec.name]} data sets")
    return problems


def read_sources(cfg: Config) -> Sources:
    """Parse every configured data set on the driver (text only), or generate ShapesWorld."""
    if cfg.data.source == "shapes":
        from inbol_ray.data.shapes import generate_items

        return Sources(conform(generate_items(cfg.data.shapes, cfg.model.image_size), ITEMS, "shapes"))
    rows: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    first_source: dict[str, str] = {}
    for spec in cfg.data.datasets:
        parsed = load(spec)
        bad += parsed.quarantine
        for row in parsed.items:  # later stages join on id: a second row with the same id would corrupt them
            if row[ID] in first_source:
                reason = f"duplicate field '{ID}' (first row with this id came from {first_source[row[ID]]})"
                bad.append({SOURCE: row[SOURCE], ROW_KEY: row[ID], REASON: reason, DATASET: row[DATASET]})
                continue
            first_source[row[ID]] = row[SOURCE]
            rows.append(row)
    data = cfg.data
    if not data.unanswerable_per_answerable:
        return Sources(items_table(rows), bad)
    built = build_mismatches(
        rows,
        data.unanswerable_per_answerable,
        seed=data.mismatch_seed,
        max_referent_share=data.mismatch_max_referent_share,
        max_image_uses=data.mismatch_max_image_uses,
    )  # ids are `mismatch:<question id>@<image id>`, one per question: unique, and unlike any loader's id
    return Sources(items_table(rows + built.rows), bad, built.counts)


# --- the Ray Data stage ---------------------------------------------------------------------------------


def _good_rows(batch: pa.Table) -> pa.Table:
    mask = pc.is_null(batch[REASON])
    return batch.filter(mask).select(ITEMS.names).cast(ITEMS)


def _bad_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch[REASON])).select(_BAD_COLUMNS)


def _blocks(table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    """Several input blocks so the map stage runs as several tasks instead of one serial task."""
    return [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]


def run_prepare(
    cfg: Config,
    layout: RunLayout,
    sources: Sources | None = None,
    *,
    batch_size: int = 16,
    rows_per_block: int = 256,
) -> PrepareResult:
    """Run the stage (Ray must be initialised); overwrite `layout.items` and the stage's quarantine.

    `sources`: already parsed input (default: `read_sources(cfg)`).

    `batch_size` is small because a batch holds its rows' encoded images (and one decoded image at a time);
    `rows_per_block` sets how many tasks the image stage fans out to. The checked data set is materialised
    once so images are read and decoded once; Ray spills it to disk when it outgrows the object store.
    """
    import ray

    sources = sources if sources is not None else read_sources(cfg)
    items_uri = layout.items
    dio.remove(items_uri)
    bad: list[dict[str, Any]] = list(sources.quarantine)
    if sources.items.num_rows:
        data = cfg.data
        checked = (
            ray.data.from_arrow(_blocks(sources.items, rows_per_block))
            .map_batches(
                check_images,
                batch_format="pyarrow",
                batch_size=batch_size,
                fn_kwargs={
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
        for row in checked.map_batches(_bad_rows, batch_format="pyarrow", batch_size=None).take_all():
            bad.append({SOURCE: row[SOURCE], ROW_KEY: row[ID], REASON: row[REASON], DATASET: row[DATASET]})
    if not dio.exists(items_uri) or not dio.list_files(items_uri, suffix=".parquet"):
        dio.write_table(ITEMS.empty_table(), dio.join(items_uri, "empty.parquet"))
    quarantine_uri = dio.write_quarantine(bad, layout.root, STAGE_NAME)  # at layout.quarantine(STAGE_NAME)
    counts = _counts(sources, bad, dio.read_table(items_uri, columns=[DATASET]))
    return PrepareResult(items_uri, quarantine_uri, counts, dict(sources.mismatch))


def _counts(sources: Sources, bad: list[dict[str, Any]], written: pa.Table) -> dict[str, dict[str, int]]:
    """Per-data-set counts, and the no-silent-loss check: read == written + quarantined."""
    read = Counter(sources.items.column(DATASET).to_pylist()) + Counter(
        r[DATASET] for r in sources.quarantine
    )
    kept = Counter(written.column(DATASET).to_pylist())
    quarantined = Counter(r[DATASET] for r in bad)
    counts = {}
    for name in sorted(set(read) | set(kept) | set(quarantined)):
        counts[name] = {"read": read[name], "items": kept[name], "quarantined": quarantined[name]}
        if read[name] != kept[name] + quarantined[name]:
            raise RuntimeError(f"prepare lost rows of {name}: {counts[name]} (read != items + quarantined)")
    return counts
