"""Shards of a generation stage: which items go where, which are finished, and writing a finished one.

Why shards: generating over items is the expensive part of the pipeline (hundreds of thousands of items
x K), so a crash must not cost the whole run. Each item belongs to shard `crc32(id) % n_shards`, computed
from the id alone, so no global index has to be shipped to workers. The driver collects graded rows per
shard and writes a shard as soon as all of its rows have arrived: data first (`shard-00007.parquet`,
atomic), then its manifest (`_shard-00007.json`: counts and quarantined rows). A shard counts as finished
only when its manifest matches the run's plan hash (`manifest.fingerprint` of the model, the decoding,
the grading and the selected ids); a changed plan starts over. Leading underscores keep the manifests out
of Parquet discovery, so the folder reads as one table.

Also here: the read plan. The driver reads only the key columns of `items`, row group by row group, and
turns the row groups holding unfinished rows into read units of about one actor batch each, so Ray Data
gets many small blocks (every actor busy even when `items` is one file) and finished rows are never read.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from inbol_ray.data import io as dio
from inbol_ray.manifest import fingerprint
from inbol_ray.schema import (
    ANSWERABLE,
    DATASET,
    ID,
    QUARANTINE,
    REASON,
    ROW_KEY,
    SOURCE,
    SPLIT,
    STAGE,
    conform,
)

SHARD = "shard"  # pipeline-internal column: which output shard a row belongs to
MAX_SLICES_PER_ROW_GROUP = 8
"""A read unit re-reads its whole row group, so a row group is cut into at most this many units."""
KEY_COLUMNS = [ID, DATASET, SPLIT, ANSWERABLE]


def shard_of(item_id: str, n_shards: int) -> int:
    return zlib.crc32(item_id.encode()) % n_shards


@dataclass(frozen=True)
class Selection:
    """Which rows of `items` a stage generates for (None: no condition)."""

    splits: tuple[str, ...] | None = None
    datasets: tuple[str, ...] | None = None
    answerable_only: bool = False

    def mask(self, table: pa.Table) -> pa.Array:
        mask = pa.array([True] * table.num_rows, type=pa.bool_())
        if self.splits:
            mask = pc.and_(mask, pc.is_in(table[SPLIT], value_set=pa.array(list(self.splits), pa.string())))
        if self.datasets:
            wanted = pa.array(list(self.datasets), type=pa.string())
            mask = pc.and_(mask, pc.is_in(table[DATASET], value_set=wanted))
        if self.answerable_only:
            mask = pc.and_(mask, table[ANSWERABLE])
        return mask


@dataclass(frozen=True)
class RowGroupKeys:
    """The selected ids of one row group of one items file (what the driver knows before reading images)."""

    uri: str
    row_group: int
    num_rows: int
    selected: list[tuple[int, str, str]]
    """(row index within the row group, id, dataset) of every selected row."""


def scan_items(items_uri: str, selection: Selection) -> list[RowGroupKeys]:
    """Read the key columns of `items` (a Parquet file or folder of them), row group by row group."""
    kind = dio.file_type(items_uri)
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"items not found: {items_uri}")
    files = dio.list_files(items_uri, suffix=".parquet") if kind == pafs.FileType.Directory else [items_uri]
    found = []
    for uri in files:
        fs, path = dio.resolve(uri)
        parquet = pq.ParquetFile(fs.open_input_file(path))
        for rg in range(parquet.num_row_groups):
            keys = parquet.read_row_group(rg, columns=KEY_COLUMNS)
            rows = pc.indices_nonzero(selection.mask(keys)).to_pylist()
            ids, sets = keys[ID].to_pylist(), keys[DATASET].to_pylist()
            found.append(RowGroupKeys(uri, rg, keys.num_rows, [(i, ids[i], sets[i]) for i in rows]))
    return found


def read_units(keys: list[RowGroupKeys], n_shards: int, pending: set[int], rows_per_unit: int) -> list[dict]:
    """Read units of about `rows_per_unit` wanted rows (selected, in an unfinished shard) each.

    A unit is a list of slices (uri, row_group, start, length), each holding at least one wanted row.
    Small row groups (prepare writes many) are gathered into one unit: one task per row group cost a
    Ray Data task and a Parquet open per 16 rows, and on 2 cores those light tasks took as much CPU as
    the generation itself. A large row group is cut into at most MAX_SLICES_PER_ROW_GROUP slices.
    """
    units: list[dict] = []
    current: list[dict[str, Any]] = []
    count = 0
    for rg in keys:
        step = max(rows_per_unit, math.ceil(rg.num_rows / MAX_SLICES_PER_ROW_GROUP))
        wanted = sorted(i for i, item_id, _ in rg.selected if shard_of(item_id, n_shards) in pending)
        for start in range(0, rg.num_rows, step):
            n = sum(start <= i < start + step for i in wanted)
            if not n:
                continue
            length = min(step, rg.num_rows - start)
            current.append({"uri": rg.uri, "row_group": rg.row_group, "start": start, "length": length})
            count += n
            if count >= rows_per_unit:
                units.append({"slices": current})
                current, count = [], 0
    if current:
        units.append({"slices": current})
    return units


def read_unit(unit: dict[str, Any]) -> pa.Table:
    """The rows of a read unit's slices (every selected row of them, wanted or not: the caller filters)."""
    tables = []
    for piece in unit["slices"]:
        fs, path = dio.resolve(piece["uri"])
        table = pq.ParquetFile(fs.open_input_file(path)).read_row_group(int(piece["row_group"]))
        tables.append(table.slice(int(piece["start"]), int(piece["length"])))
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


@dataclass(frozen=True)
class Plan:
    n_shards: int
    expected: dict[int, int]
    """Rows per shard, every shard listed (a shard may be empty: crc32 does not fill them evenly)."""
    run_hash: str


def make_plan(ids: Sequence[str], shard_rows: int, **depends_on: Any) -> Plan:
    """Shard layout and the hash that says whether an earlier run's shards can be reused.

    `depends_on`: everything the outputs depend on besides the ids (model stamp, decoding, grading, ...);
    never batch sizes or actor counts, which do not change a single output.
    """
    duplicated = [i for i, n in Counter(ids).items() if n > 1]
    if duplicated:
        raise ValueError(f"items have duplicate ids (e.g. {duplicated[:3]}); outputs are keyed by id")
    n_shards = max(1, math.ceil(len(ids) / shard_rows))
    counts = Counter(shard_of(i, n_shards) for i in ids)
    ids_hash = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
    run_hash = fingerprint(n_shards=n_shards, ids=ids_hash, **depends_on)
    return Plan(n_shards, {s: counts.get(s, 0) for s in range(n_shards)}, run_hash)


def shard_uri(out_uri: str, shard: int) -> str:
    return dio.join(out_uri, f"shard-{shard:05d}.parquet")


def shard_manifest_uri(out_uri: str, shard: int) -> str:
    return dio.join(out_uri, f"_shard-{shard:05d}.json")


def _read_json(uri: str) -> dict[str, Any] | None:
    return json.loads(dio.read_bytes(uri).decode()) if dio.exists(uri) else None


def _write_json(uri: str, body: dict[str, Any]) -> None:
    dio.write_bytes(uri, json.dumps(body, indent=1).encode())  # atomic: never half a manifest


def finished_shards(out_uri: str, plan: Plan) -> dict[int, dict[str, Any]]:
    """Manifests of shards an earlier run finished under the same plan; a changed plan starts over."""
    plan_uri = dio.join(out_uri, "_plan.json")
    found = _read_json(plan_uri)
    if found is None or found.get("run_hash") != plan.run_hash:
        dio.remove(out_uri)
        _write_json(plan_uri, {"run_hash": plan.run_hash, "n_shards": plan.n_shards})
        return {}
    done = {}
    for shard in plan.expected:
        body = _read_json(shard_manifest_uri(out_uri, shard))
        if body and body.get("run_hash") == plan.run_hash and dio.exists(shard_uri(out_uri, shard)):
            done[shard] = body
    return done


class ShardCollector:
    """Buffers graded rows per shard and writes a shard (data, then manifest) once all its rows arrived.

    Rows carry the output schema's columns plus `shard`, `source` and `reason` (set for quarantined rows).
    The first row per id wins; later copies (possible only if a retried task's first output also arrived)
    are counted in `duplicates` and dropped, so a shard never holds an id twice.
    """

    def __init__(self, out_uri: str, plan: Plan, pending: list[int], schema: pa.Schema, k: int) -> None:
        self.out_uri, self.plan, self.schema, self.k = out_uri, plan, schema, k
        self.rows: dict[int, dict[str, dict[str, Any]]] = {s: {} for s in pending}
        self.written: dict[int, dict[str, Any]] = {}
        self.duplicates = 0
        for shard in pending:
            if plan.expected[shard] == 0:  # nothing will arrive for it: write the empty shard now
                self.write(shard)

    def add(self, batch: pa.Table) -> None:
        for row in batch.to_pylist():
            shard = int(row[SHARD])
            if shard in self.written or row[ID] in self.rows[shard]:
                self.duplicates += 1
                continue
            self.rows[shard][row[ID]] = row
            if len(self.rows[shard]) == self.plan.expected[shard]:
                self.write(shard)

    def write(self, shard: int) -> None:
        rows = sorted(self.rows.pop(shard).values(), key=lambda r: r[ID])
        good = [r for r in rows if r[REASON] is None]
        bad = [{SOURCE: r[SOURCE], ROW_KEY: r[ID], REASON: r[REASON]} for r in rows if r[REASON] is not None]
        table = pa.Table.from_pylist(good, schema=self.schema) if good else self.schema.empty_table()
        dio.write_table(conform(table, self.schema, f"shard {shard}"), shard_uri(self.out_uri, shard))
        body = {
            "run_hash": self.plan.run_hash,
            "shard": shard,
            "rows": len(rows),
            "done": len(good),
            "new_outputs": len(good) * self.k,
            "quarantine": bad,
        }
        _write_json(shard_manifest_uri(self.out_uri, shard), body)
        self.written[shard] = body

    def missing(self) -> dict[int, str]:
        """Shards still incomplete: after a finished run this must be empty (else rows were lost)."""
        return {s: f"{len(rows)}/{self.plan.expected[s]} rows" for s, rows in self.rows.items()}


def write_quarantine(rows: list[dict[str, Any]], uri: str, stage: str) -> str:
    """A stage's quarantine rows (QUARANTINE schema) at `uri`; an empty file says it quarantined nothing."""
    records = [{**row, STAGE: stage} for row in rows]
    table = pa.Table.from_pylist(records, schema=QUARANTINE) if records else QUARANTINE.empty_table()
    dio.write_table(conform(table, QUARANTINE, f"quarantine of stage {stage}"), uri)
    return uri
