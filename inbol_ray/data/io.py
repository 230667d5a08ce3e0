"""Table and file I/O through pyarrow filesystems, so every stage works on local paths and `s3://…` alike.

A location is a *URI string*: a plain local path (made absolute, so Ray workers started in another working
directory still find it) or anything `pyarrow.fs.FileSystem.from_uri` understands. Stages pass URIs around,
never filesystem objects, because URIs pickle into Ray tasks and read well in tables and logs.

Tables are Parquet. A table location is a file or a folder of Parquet shards (what Ray Data writes);
`read_table` accepts both. Quarantine rows of a stage go to `<run_dir>/quarantine/<stage>.parquet`, one file
per stage that a rerun replaces, so quarantine stays idempotent without an append protocol.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from inbol_ray.schema import QUARANTINE, STAGE, conform

QUARANTINE_DIR = "quarantine"
_OBJECT_STORES = ("s3", "gs", "gcs")


def is_uri(location: str) -> bool:
    """True for `scheme://…` locations (s3, gs, hdfs, file, …), False for plain local paths."""
    return "://" in location


@functools.lru_cache(maxsize=16)
def _filesystem_for(prefix: str) -> pafs.FileSystem:
    """One filesystem per scheme+authority per process: building an S3 client per image would be slow."""
    fs, _ = pafs.FileSystem.from_uri(prefix)
    return fs


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """Turn a URI or local path into (filesystem, path inside that filesystem)."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
    scheme, rest = location.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(rest)
    if scheme in _OBJECT_STORES:  # path inside the store is `bucket/key`: no need to re-parse per file
        rest = rest.split("?", 1)[0]
        return _filesystem_for(f"{scheme}://{rest.split('/', 1)[0]}"), rest
    return pafs.FileSystem.from_uri(location)


def absolute(location: str) -> str:
    """A location any process on the cluster can open: local paths made absolute, URIs unchanged."""
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def join(base: str, *parts: str) -> str:
    """Join path parts with `/` (pyarrow filesystems use `/` everywhere, local ones included)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def parent(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[0]


def file_type(location: str) -> pafs.FileType:
    fs, path = resolve(location)
    return fs.get_file_info(path).type


def exists(location: str) -> bool:
    return file_type(location) != pafs.FileType.NotFound


def read_bytes(location: str) -> bytes:
    """Whole file as bytes; FileNotFoundError (from pyarrow) when it does not exist."""
    fs, path = resolve(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(location: str, data: bytes) -> str:
    """Write a whole file atomically where the filesystem allows (temp name, then move), parent folders
    created; returns `location`. Manifests, stamps and reports are read as "done" markers: never half."""
    fs, path = resolve(location)
    fs.create_dir(parent(path), recursive=True)
    tmp = f"{parent(path)}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)
    return location


def list_files(location: str, suffix: str = "", prefix: str = "") -> list[str]:
    """Files below a folder (recursive, sorted) whose names start with `prefix` and end with `suffix`.

    Names starting with `.` or `_` are skipped, like Parquet dataset discovery does (`_SUCCESS`, temp files).
    """
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    found = []
    for info in infos:
        name = info.base_name
        if info.type != pafs.FileType.File or name.startswith((".", "_")):
            continue
        if name.endswith(suffix) and name.startswith(prefix):
            found.append(info.path)
    base = absolute(location).rstrip("/")
    return sorted(base + p[len(path.rstrip("/")) :] for p in found)


def remove(location: str) -> None:
    """Delete a file or folder if it exists (stages overwrite their own outputs on rerun)."""
    fs, path = resolve(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


ROW_GROUP_ROWS = 8192
"""Rows per Parquet row group: the unit a training worker reads (inbol_ray.train.table_rows), so a worker
holds a pool of these, never a whole million-row table (pyarrow's default is ~1M rows per group)."""


def write_table(table: pa.Table, location: str) -> None:
    """Write one Parquet file atomically where the filesystem allows (temp name, then move).

    Readers must never see half a file: a crash mid-write leaves only a `.tmp-…` name that discovery skips.
    """
    fs, path = resolve(location)
    fs.create_dir(parent(path), recursive=True)
    tmp = f"{parent(path)}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    pq.write_table(table, tmp, filesystem=fs, row_group_size=ROW_GROUP_ROWS)
    fs.move(tmp, path)


def read_table(location: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file or a folder of Parquet shards (only `columns`, when given: cheap projections)."""
    fs, path = resolve(location)
    return pq.read_table(path, filesystem=fs, columns=columns)


class TableFile:
    """One Parquet file written a table at a time, then moved into place (see `write_table`): a stage whose
    output outgrows memory (prepare's quarantine of a bad million-row file) writes it without holding it."""

    def __init__(self, location: str, schema: pa.Schema) -> None:
        self.fs, self.path = resolve(location)
        self.fs.create_dir(parent(self.path), recursive=True)
        self.tmp = f"{parent(self.path)}/.tmp-{uuid.uuid4().hex}-{self.path.rsplit('/', 1)[-1]}"
        self.schema, self.rows = schema, 0
        self.writer = pq.ParquetWriter(self.tmp, schema, filesystem=self.fs)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table.cast(self.schema), row_group_size=ROW_GROUP_ROWS)
        self.rows += table.num_rows

    def close(self) -> None:
        """Finish the file (an empty one still says the stage ran) and move it into place."""
        self.writer.close()
        self.fs.move(self.tmp, self.path)

    def __enter__(self) -> TableFile:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is None:
            self.close()
        else:  # a failed stage leaves no half file under the real name
            self.writer.close()
            self.fs.delete_file(self.tmp)


def parquet_files(location: str) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and the Parquet files of a table location (one file, or a folder's in name order)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        return fs, [path]
    return fs, [resolve(uri)[1] for uri in list_files(location, suffix=".parquet")]


def row_count(location: str) -> int:
    """Rows of a Parquet file or folder, from the footers alone."""
    fs, files = parquet_files(location)
    return sum(pq.read_metadata(name, filesystem=fs).num_rows for name in files)


def iter_batches(
    location: str, columns: list[str] | None = None, batch_rows: int = 8192
) -> Iterator[pa.RecordBatch]:
    """A Parquet file's or folder's rows a batch at a time, files in name order: reads what one batch needs."""
    fs, files = parquet_files(location)
    for name in files:
        with fs.open_input_file(name) as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=columns)


def quarantine_uri(run_dir: str, stage: str) -> str:
    return join(absolute(run_dir), QUARANTINE_DIR, f"{stage}.parquet")


def write_quarantine(rows: Iterable[Mapping[str, Any]], run_dir: str, stage: str) -> str:
    """Write a stage's quarantine rows (QUARANTINE schema; extra keys are dropped); return the file URI.

    The stage column is filled here so callers cannot mislabel rows. An empty file is still written: its
    presence says the stage ran and quarantined nothing.
    """
    records = [{**row, STAGE: stage} for row in rows]
    table = pa.Table.from_pylist(records, schema=QUARANTINE) if records else QUARANTINE.empty_table()
    uri = quarantine_uri(run_dir, stage)
    write_table(conform(table, QUARANTINE, f"quarantine of stage {stage}"), uri)
    return uri


def read_quarantine(run_dir: str) -> pa.Table:
    """All stages' quarantine rows (an empty table when none was written yet)."""
    folder = join(absolute(run_dir), QUARANTINE_DIR)
    if not exists(folder):
        return QUARANTINE.empty_table()
    tables = [conform(read_table(uri), QUARANTINE, uri) for uri in list_files(folder, suffix=".parquet")]
    return pa.concat_tables(tables) if tables else QUARANTINE.empty_table()
