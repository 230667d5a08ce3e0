"""The prepare stage: data sets in their published formats (or ShapesWorld) -> `items` + `quarantine`.

Three steps, split by where they run:
1. `input_problems` (driver, no Ray): every configured path exists, so a typo fails in a second.
2. `read_sources` (driver, no Ray): the loaders parse annotation files into item rows, streamed in chunks
   (`loaders.load_streaming`) to Parquet parts under the run's `staging/prepare` folder, so the driver
   holds one chunk, never the data set: a JSONL of millions of rows (OVEN) parses in bounded memory. Only
   text is parsed here; a file in the wrong format raises `DataFormatError` before any Ray work. Ids must be
   unique (later stages join on them): each chunk's ids are also staged sorted, and a k-way merge of those
   runs finds repeats holding one batch per chunk; the first row (input order) wins, the others are
   quarantined. With `data.unanswerable_per_answerable` > 0 it then adds mismatched unanswerable training
   rows (a training question on another training image, `inbol_ray.data.mismatch`) as data sets
   `<name>_mismatch`; they reuse an existing image's bytes or path, so step 3 checks them like any row.
   The recipe holds one shard of compact per-row data at a time (`mismatch_staged.plan_staged`), never the
   answerable rows; with fewer than `data.mismatch_min_fill` of its target built, the stage fails.
3. `run_prepare` (Ray Data): a CPU `map_batches` stage over the staged parts opens every image (bytes in
   the row, or the file at `image_path`), validates it (decodable, within `data.max_image_bytes` /
   `data.max_image_pixels`), stores bytes or keeps the path (`data.image_storage`), and tags bad rows with a
   reason (`images.check_images`). Good rows are written to the run layout's `items` (Parquet shards), bad
   rows plus the loaders' rows to its `quarantine("prepare")`, a batch at a time.

Invariant, checked per data set after writing: rows read = rows in `items` + rows quarantined.
With `image_storage: path`, rows whose format embeds images (MMMU, MMBench) keep their bytes: there is no
file to point at.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from inbol_ray.config import Config, DataConfig
from inbol_ray.data import io as dio
from inbol_ray.data.coco_categories import read_instances
from inbol_ray.data.images import check_images
from inbol_ray.data.loaders import items_table, load_streaming, spec_problems
from inbol_ray.data.loaders.common import CHUNK_ROWS
from inbol_ray.data.mismatch import check_fill
from inbol_ray.data.mismatch import summary as mismatch_summary
from inbol_ray.data.mismatch_staged import fill_staged, plan_staged
from inbol_ray.run_layout import RunLayout
from inbol_ray.schema import (
    DATASET,
    ID,
    ITEMS,
    QUARANTINE,
    REASON,
    ROW_KEY,
    SOURCE,
    STAGE,
    conform,
)

STAGE_NAME = "prepare"


SEQ = "_seq"
"""Staged rows' position in input order: which of two rows with one id came first."""
STAGED = ITEMS.append(pa.field(SEQ, pa.int64()))
_STAGED_IDS = pa.schema([(ID, pa.string()), (SEQ, pa.int64()), (SOURCE, pa.string()), (DATASET, pa.string())])
_LOADER_BAD = pa.schema(
    [(SOURCE, pa.string()), (ROW_KEY, pa.string()), (REASON, pa.string()), (DATASET, pa.string())]
)


@dataclass
class Sources:
    """Parsed input of the stage, staged under `root` (Parquet parts): item rows still to be image-checked
    (`root/items`, with their input position), the loaders' and the id check's rejects (`root/quarantine`)."""

    root: str
    read: dict[str, int] = field(default_factory=dict)
    """Rows read per data set (items + loader rejects; mismatched rows: what was built)."""
    duplicates: frozenset[int] = frozenset()
    """Input positions of rows whose id an earlier row already has (quarantined, not image-checked)."""
    mismatch: dict[str, int] = field(default_factory=dict)
    """Counts of the mismatched rows (`MismatchResult.counts`: wanted, built, short, why); empty when none
    were asked for."""
    not_sampled: dict[str, int] = field(default_factory=dict)
    """Usable rows left out of a data set's `sample_rows` subset, per data set (counted in `read`)."""

    @property
    def items_parts(self) -> str:
        return dio.join(self.root, "items")

    @property
    def quarantine_parts(self) -> str:
        return dio.join(self.root, "quarantine")

    @property
    def items(self) -> pa.Table:
        """The usable staged rows as one ITEMS table (for tests and small exports: this one is whole)."""
        staged = dio.read_table(self.items_parts)
        return (
            staged.filter(first_rows(staged, positions(self.duplicates)))
            .sort_by(SEQ)
            .select(ITEMS.names)
            .cast(ITEMS)
        )

    @property
    def quarantine(self) -> list[dict[str, Any]]:
        """The staged rejects (loaders' and repeated ids'), in the order they were found."""
        if not dio.exists(self.quarantine_parts):
            return []
        return dio.read_table(self.quarantine_parts).to_pylist()


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
        used = spec.instances and data.unanswerable_per_answerable and spec.split == "train"
        if used and not dio.exists(spec.instances):
            problems.append(f"data.datasets[{i}] {spec.name}: instances file not found: {spec.instances}")
    return problems


def shapes_items(cfg: Config) -> pa.Table:
    """ShapesWorld's items as `data.source: shapes` prepares them (synthetic: small by design)."""
    from inbol_ray.data.shapes import generate_items

    return conform(generate_items(cfg.data.shapes, cfg.model.image_size), ITEMS, "shapes")


class _Stager:
    """Writes parsed rows to Parquet parts as they arrive and counts them; numbers rows in input order."""

    def __init__(self, root: str) -> None:
        self.root, self.seq, self.parts = root, 0, 0
        self.read: Counter[str] = Counter()

    def _part(self, kind: str) -> str:
        self.parts += 1
        return dio.join(self.root, kind, f"part-{self.parts:06d}.parquet")

    def items(self, rows: list[dict[str, Any]] | pa.Table) -> None:
        table = rows if isinstance(rows, pa.Table) else items_table(rows)
        if not table.num_rows:
            return
        seq = pa.array(range(self.seq, self.seq + table.num_rows), pa.int64())
        self.seq += table.num_rows
        table = table.select(ITEMS.names).cast(ITEMS).append_column(SEQ, seq)
        self.read.update(table[DATASET].to_pylist())
        part = self._part("items")
        dio.write_table(table, part)
        ids = table.select([ID, SEQ, SOURCE, DATASET]).sort_by([(ID, "ascending"), (SEQ, "ascending")])
        dio.write_table(ids, part.replace("/items/", "/ids/"))

    def bad(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.read.update(r[DATASET] for r in rows)
            self.quarantined(rows)

    def quarantined(self, rows: list[dict[str, Any]]) -> None:
        """Rows rejected after being read (repeated ids): quarantine, without counting them read twice."""
        if rows:
            dio.write_table(pa.Table.from_pylist(rows, schema=_LOADER_BAD), self._part("quarantine"))


def _id_runs(uri: str) -> Iterator[tuple[str, int, str, str]]:
    for batch in dio.iter_batches(uri, batch_rows=256):
        yield from zip(*(batch[name].to_pylist() for name in _STAGED_IDS.names), strict=True)


def _repeated_ids(stager: _Stager) -> frozenset[int]:
    """Input positions of rows whose id an earlier row has; each quarantined naming the first row's file.

    A k-way merge of the per-part sorted id runs: memory is one batch per part, however many rows."""
    folder = dio.join(stager.root, "ids")
    runs = [_id_runs(uri) for uri in dio.list_files(folder, suffix=".parquet")] if dio.exists(folder) else []
    repeated: list[int] = []
    bad: list[dict[str, Any]] = []
    first: tuple[str, str] | None = None
    for key, seq, source, dataset in heapq.merge(*runs):  # (id, seq) order: the first row of an id leads
        if first is not None and key == first[0]:
            reason = f"duplicate field '{ID}' (first row with this id came from {first[1]})"
            bad.append({SOURCE: source, ROW_KEY: key, REASON: reason, DATASET: dataset})
            repeated.append(seq)
            if len(bad) >= CHUNK_ROWS:
                stager.quarantined(bad)
                bad = []
        else:
            first = (key, source)
    stager.quarantined(bad)
    return frozenset(repeated)


def positions(seqs: frozenset[int]) -> pa.Array:
    """Input positions as the Arrow array `first_rows` filters by (built once per stage, not per batch)."""
    return pa.array(sorted(seqs), pa.int64())


def first_rows(table: pa.Table, repeated: pa.Array) -> pa.Array:
    """Mask of the staged rows that are not a later row of an id an earlier row has."""
    return pc.invert(pc.is_in(table[SEQ], value_set=repeated))


def _mismatches(cfg: Config, stager: _Stager, repeated: frozenset[int]) -> dict[str, int]:
    """Build the mismatched unanswerable rows from the staged answerable training rows, and stage them.

    Bounded memory (`mismatch_staged.plan_staged`): compact per-row data by shard, one shard's index at a
    time, then one more pass over the staged parts for the chosen images. Fails (`MismatchShortfall`) when
    fewer than `data.mismatch_min_fill` of the wanted rows were built."""
    data = cfg.data
    train = [spec for spec in data.datasets if spec.split == "train"]
    instances = {spec.name: read_instances(spec.instances) for spec in train if spec.instances}
    items, work = dio.join(stager.root, "items"), dio.join(stager.root, "mismatch")
    plan = plan_staged(
        items,
        work,
        data.unanswerable_per_answerable,
        seq_column=SEQ,
        skip=positions(repeated),
        seed=data.mismatch_seed,
        max_referent_share=data.mismatch_max_referent_share,
        max_image_uses=data.mismatch_max_image_uses,
        instances=instances,
    )  # ids are `mismatch:<question id>@<image id>`, one per question: unique, and unlike any loader's id
    check_fill(
        plan.counts, data.mismatch_min_fill, [spec.name for spec in train], data.unanswerable_per_answerable
    )
    fill_staged(plan, items, stager.items, seq_column=SEQ)  # parts of 8192 rows: a few MB of dicts each
    return plan.counts


def staging_root(layout: RunLayout) -> str:
    """Where parsed rows wait for the image check: under the run, so every Ray worker can read them."""
    return layout.path("staging", STAGE_NAME)


def read_sources(cfg: Config, staging: str | None = None, chunk_rows: int = CHUNK_ROWS) -> Sources:
    """Parse every configured data set on the driver (text only), or generate ShapesWorld, and stage the
    rows under `staging` (default: `staging_root` of `cfg.run_dir`, replaced), `chunk_rows` at a time."""
    root = staging or staging_root(RunLayout.of(cfg))
    dio.remove(root)
    stager = _Stager(root)
    not_sampled: Counter[str] = Counter()
    if cfg.data.source == "shapes":
        stager.items(shapes_items(cfg))
    else:
        for spec in cfg.data.datasets:
            dropped: Counter[str] = Counter()
            load_streaming(
                spec,
                stager.items,
                stager.bad,
                chunk_rows,
                sample_seed=cfg.data.sample_seed,
                not_sampled=dropped,
            )
            stager.read.update(dropped)
            not_sampled.update(dropped)
    repeated = _repeated_ids(stager)
    mismatch = _mismatches(cfg, stager, repeated) if cfg.data.unanswerable_per_answerable else {}
    return Sources(root, dict(stager.read), repeated, mismatch, dict(not_sampled))


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
