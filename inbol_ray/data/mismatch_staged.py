"""The mismatch recipe on prepare's staged Parquet parts, in bounded memory (`inbol_ray.data.mismatch`).

Why a module of its own: `mismatch` holds the recipe and its in-memory form; this is how prepare runs it on
millions of rows without holding them: a count, a read pass that writes compact rows (`RECORD`) as Parquet
runs grouped by shard, one shard's index at a time (`mismatch_index.ShardIndex`), each shard's chosen
pairs written sorted by the image row's position, and a last pass over the staged parts that merges them
in that order to fill in the images' bytes or paths.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from inbol_ray.data import io as dio
from inbol_ray.data.coco_categories import CocoInstances
from inbol_ray.data.loaders.common import DataFormatError
from inbol_ray.data.mismatch import (
    SHARD_ROWS,
    Tally,
    build_shard,
    compact_records,
    mismatched_row,
    shard_count,
)
from inbol_ray.data.mismatch_index import RECORD, SEQ
from inbol_ray.schema import (
    ANSWERABLE,
    ANSWERS,
    CHOICES,
    DATASET,
    ID,
    IMAGE,
    IMAGE_PATH,
    METRIC,
    QUESTION,
    SPLIT,
)

RUN_ROWS = 25_000
"""Compact rows gathered before a run of them is written, grouped by shard (the read pass's buffer)."""
_MERGE_ROWS = 256
"""Rows per row group of a shard's chosen pairs: `fill_staged` merges every shard's file, holding this
many rows of each (memory O(shards x 256 rows))."""

_BUILT = pa.schema(
    [(ID, pa.string()), (DATASET, pa.string()), (QUESTION, pa.string()), ("image_id", pa.string()),
     ("image_seq", pa.int64()), ("how", pa.string())]
)  # fmt: skip


@dataclass
class StagedPlan:
    """What `plan_staged` chose: the counts and, per shard, a Parquet file of chosen pairs (sorted by the
    image row's position) that `fill_staged` turns into rows."""

    counts: dict[str, int]
    built: list[str]
    work: str


_READ = [ID, DATASET, SPLIT, ANSWERABLE, IMAGE, IMAGE_PATH, QUESTION, ANSWERS, CHOICES, METRIC]


def _answerable(batch: pa.RecordBatch | pa.Table, seq_column: str, skip: pa.Array) -> pa.Array:
    mask = pc.and_(pc.equal(batch[SPLIT], "train"), pc.fill_null(batch[ANSWERABLE], False))
    if len(skip):
        mask = pc.and_(mask, pc.invert(pc.is_in(batch[seq_column], value_set=skip)))
    return mask


class _Runs:
    """Compact rows written as Parquet runs, each run's rows of one shard in one row group."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.runs: list[tuple[str, dict[int, int]]] = []
        self.pending: list[pa.Table] = []
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= RUN_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.concat_tables(self.pending)
        self.pending, self.rows = [], 0
        table = table.take(pc.sort_indices(table, [("shard", "ascending"), (SEQ, "ascending")]))
        shards = table["shard"].to_numpy()
        starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])
        uri = dio.join(self.folder, f"run-{len(self.runs):06d}.parquet")
        fs, path = dio.resolve(uri)
        fs.create_dir(dio.parent(path), recursive=True)
        groups: dict[int, int] = {}
        with pq.ParquetWriter(path, RECORD, filesystem=fs) as writer:
            for g, (start, end) in enumerate(zip(starts, [*starts[1:], len(shards)], strict=True)):
                writer.write_table(table.slice(start, end - start), row_group_size=int(end - start))
                groups[int(shards[start])] = g
        self.runs.append((uri, groups))

    def shard(self, shard: int) -> pa.Table:
        parts = []
        for uri, groups in self.runs:
            if shard in groups:
                fs, path = dio.resolve(uri)
                with fs.open_input_file(path) as handle:
                    parts.append(pq.ParquetFile(handle).read_row_group(groups[shard]))
        return pa.concat_tables(parts) if parts else RECORD.empty_table()


def plan_staged(
    items_uri: str,
    work: str,
    ratio: float,
    *,
    seq_column: str,
    skip: pa.Array | None = None,
    seed: int = 0,
    max_referent_share: float = 0.05,
    max_image_uses: int = 2,
    tries: int = 64,
    instances: Mapping[str, CocoInstances] | None = None,
    shard_rows: int = SHARD_ROWS,
    batch_rows: int = 1024,
    image_root: str = "",
) -> StagedPlan:
    """Choose the mismatched pairs from staged `items` Parquet parts (files in input order, with the input
    position in `seq_column`; positions in `skip` are repeated ids, left out) in bounded memory: a count,
    a read pass that writes compact rows by shard under `work`, then one shard at a time."""
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    skip = skip if skip is not None else pa.array([], pa.int64())
    instances = dict(instances or {})
    answerable = 0
    for batch in dio.iter_batches(items_uri, columns=[SPLIT, ANSWERABLE, seq_column]):
        answerable += pc.sum(_answerable(batch, seq_column, skip)).as_py() or 0
    n_shards = shard_count(answerable, shard_rows)
    tally = Tally(answerable, ratio, instances)
    runs = _Runs(dio.join(work, "runs"))
    matched: Counter[str] = Counter()
    for batch in dio.iter_batches(items_uri, columns=[*_READ, seq_column], batch_rows=batch_rows):
        table = pa.Table.from_batches([batch])
        table = table.filter(_answerable(table, seq_column, skip))
        if not table.num_rows:
            continue
        records = compact_records(
            table.to_pylist(), table[seq_column].to_pylist(), n_shards, instances, image_root
        )
        tally.see_records(records)
        for name in instances:
            mine = pc.equal(records[DATASET], name)
            matched[name] += pc.sum(pc.and_(mine, pc.is_valid(records["cats"]))).as_py() or 0
            matched[f"{name} rows"] += pc.sum(mine).as_py() or 0
        runs.add(records)
    runs.flush()
    pool = pa.default_memory_pool()
    pool.release_unused()  # Arrow's allocator keeps freed pages: give them back between phases
    for name, inst in instances.items():
        if matched[f"{name} rows"] and not matched[name]:
            raise DataFormatError(
                f"data set {name}: none of its {matched[f'{name} rows']:,} training rows' images is in its "
                f"instances file {inst.uri or '(given)'} ({len(inst.ids):,} images; image ids are read from "
                f"COCO file names, COCO_<split>_<id>.jpg or <id>.jpg): wrong split's annotations?"
            )
    built_files = []
    for shard in range(n_shards):
        built = build_shard(runs.shard(shard), shard, tally, seed=seed, max_referent_share=max_referent_share,
                             max_image_uses=max_image_uses, tries=tries)  # fmt: skip
        if built:
            uri = dio.join(work, "built", f"shard-{shard:06d}.parquet")
            table = pa.Table.from_pylist([b.__dict__ for b in built], schema=_BUILT)
            fs, path = dio.resolve(uri)
            fs.create_dir(dio.parent(path), recursive=True)
            # small row groups: `fill_staged` reads every shard's file at once, a row group each
            pq.write_table(table.sort_by([("image_seq", "ascending"), (ID, "ascending")]), path,
                           filesystem=fs, row_group_size=_MERGE_ROWS)  # fmt: skip
            built_files.append(uri)
        pool.release_unused()
    dio.remove(dio.join(work, "runs"))
    return StagedPlan(tally.counts(n_shards), built_files, work)


def fill_staged(
    plan: StagedPlan,
    items_uri: str,
    emit: Callable[[list[dict[str, Any]]], None],
    *,
    seq_column: str,
    chunk_rows: int = dio.ROW_GROUP_ROWS,
    chunk_bytes: int = 64 << 20,
) -> int:
    """The planned rows, with their images' bytes or paths from one more pass over the staged parts (the
    file list is fixed first, so rows `emit` stages into the same folder are not read back); handed to
    `emit` `chunk_rows` (or `chunk_bytes` of image bytes) at a time. Returns how many were emitted."""
    fs, files = dio.parquet_files(items_uri)

    def staged() -> Iterator[pa.RecordBatch]:
        for name in files:
            with fs.open_input_file(name) as handle:
                yield from pq.ParquetFile(handle).iter_batches(
                    batch_size=256, columns=[seq_column, IMAGE, IMAGE_PATH]
                )

    def planned(uri: str) -> Iterator[dict[str, Any]]:
        for batch in dio.iter_batches(uri, batch_rows=_MERGE_ROWS):
            yield from batch.to_pylist()

    batches = staged()
    seqs, current = np.empty(0, np.int64), None
    out: list[dict[str, Any]] = []
    size = emitted = 0
    for b in heapq.merge(*(planned(u) for u in plan.built), key=lambda r: (r["image_seq"], r[ID])):
        while not len(seqs) or b["image_seq"] > seqs[-1]:
            current = next(batches)
            seqs = current.column(0).to_numpy()
        i = int(np.searchsorted(seqs, b["image_seq"]))
        if seqs[i] != b["image_seq"]:
            raise RuntimeError(f"mismatch: image row at position {b['image_seq']} not found in {items_uri}")
        image = {
            ID: b["image_id"],
            IMAGE: current.column(1)[i].as_py(),
            IMAGE_PATH: current.column(2)[i].as_py(),
        }
        out.append(mismatched_row({ID: b[ID], DATASET: b[DATASET], QUESTION: b[QUESTION]}, image, b["how"]))
        size += len(image[IMAGE] or b"")
        if len(out) >= chunk_rows or size >= chunk_bytes:
            emit(out)
            emitted, out, size = emitted + len(out), [], 0
    if out:
        emit(out)
        emitted += len(out)
    dio.remove(plan.work)
    return emitted
