"""Training rows read from the table's Parquet files a pool at a time: what bounds a worker's memory.

A training table can have millions of rows (VQAv2 train ~443k, OVEN millions) and every worker needs rows
from all of it, in an order that is a pure function of (seed, epoch) so that a resumed or re-sharded run
trains on exactly the same rows per step. Holding the table (and its token ids) per worker does not scale;
neither does a global permutation, whose every step touches rows all over the files. So the epoch order is
built from the files' row groups ("blocks"):

- blocks are the row groups of the table's Parquet files, files in name order, groups in file order, so a
  row's index is its position on disk, whatever Ray Data or the writer's parallelism did;
- an epoch permutes the blocks (seed, epoch), cuts that sequence into pools of about `window_rows` rows
  (whole blocks), and permutes the rows inside each pool (seed, epoch, pool); the epoch order is the pools
  one after another. A step's rows lie in one pool or two adjacent ones, so a worker holds at most about two
  pools (2 x window_rows rows plus a block) and reads each block once per epoch;
- a table of at most `window_rows` rows is one pool, read whole and sorted by id, and its order is
  `rng(seed, epoch).permutation(n)`: exactly the order every run before this module used.

Batches mix data sets because the blocks of a pool come from anywhere in the table. Writers keep row groups
small (`inbol_ray.data.io.write_table`); a table written elsewhere with huge row groups still trains, with
memory bounded by its largest row group instead (a warning says so).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from inbol_ray.data import io as dio
from inbol_ray.train.data import sort_by_id


@dataclass(frozen=True)
class Block:
    path: str
    """File path inside `TableBlocks.fs`."""
    row_group: int
    start: int
    """Index of its first row in the whole table."""
    rows: int


@dataclass(frozen=True)
class TableBlocks:
    """Where every row of a training table is, from the Parquet footers alone (no data read)."""

    uri: str
    blocks: tuple[Block, ...]
    n_rows: int
    fs: pafs.FileSystem = field(compare=False)

    @property
    def largest_block(self) -> int:
        return max((b.rows for b in self.blocks), default=0)

    def read(self, b: int, columns: list[str] | None = None) -> pa.Table:
        """The rows of block `b` (its row group only)."""
        block = self.blocks[b]
        with self.fs.open_input_file(block.path) as f:
            return pq.ParquetFile(f).read_row_group(block.row_group, columns=columns)


def open_blocks(uri: str, allow_empty: bool = False) -> TableBlocks:
    """The row groups of `uri` (one Parquet file or a folder of them) in table order."""
    fs, files = dio.parquet_files(uri)
    if not files:
        raise FileNotFoundError(f"training table {uri}: no Parquet files")
    blocks, start = [], 0
    for file in files:
        meta = pq.ParquetFile(file, filesystem=fs).metadata
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if n:
                blocks.append(Block(file, g, start, n))
                start += n
    if start == 0 and not allow_empty:
        raise ValueError(f"training table {uri} is empty")
    return TableBlocks(uri, tuple(blocks), start, fs)


def _cut_pools(table: TableBlocks, seed: int, epoch: int, window_rows: int) -> list[list[int]]:
    if table.n_rows <= window_rows:
        return [list(range(len(table.blocks)))]
    order = np.random.default_rng([seed, epoch]).permutation(len(table.blocks))
    out, current, size = [], [], 0
    for b in order.tolist():
        current.append(b)
        size += table.blocks[b].rows
        if size >= window_rows:
            out.append(current)
            current, size = [], 0
    if current:
        out.append(current)
    return out


@functools.lru_cache(maxsize=4)
def _pools(table: TableBlocks, seed: int, epoch: int, window_rows: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(p) for p in _cut_pools(table, seed, epoch, window_rows))


def pools(table: TableBlocks, seed: int, epoch: int, window_rows: int) -> tuple[tuple[int, ...], ...]:
    """The epoch's pools, as block indices (see the module docstring)."""
    return _pools(table, seed, epoch, window_rows)


@functools.lru_cache(maxsize=2)
def _epoch(table: TableBlocks, seed: int, epoch: int, window_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(row order of the epoch, pool index of each position): 16 bytes per row, the only O(n) state."""
    if table.n_rows <= window_rows:
        order = np.random.default_rng([seed, epoch]).permutation(table.n_rows)
        return order, np.zeros(table.n_rows, dtype=np.int32)
    orders, pool_of = [], []
    for p, blocks in enumerate(pools(table, seed, epoch, window_rows)):
        rows = np.concatenate(
            [np.arange(table.blocks[b].start, table.blocks[b].start + table.blocks[b].rows) for b in blocks]
        )
        orders.append(rows[np.random.default_rng([seed, epoch, p]).permutation(len(rows))])
        pool_of.append(np.full(len(rows), p, dtype=np.int32))
    return np.concatenate(orders), np.concatenate(pool_of)


def epoch_order(table: TableBlocks, seed: int, epoch: int, window_rows: int) -> np.ndarray:
    return _epoch(table, seed, epoch, window_rows)[0]


class RowReader:
    """Rows of a training table by index, holding only the blocks of the pools the current step draws from
    (a step may straddle two pools). Tables that fit one window are read whole and sorted by id, as the loop
    always did with them."""

    def __init__(self, table: TableBlocks, seed: int, window_rows: int) -> None:
        self.table, self.seed, self.window_rows = table, seed, window_rows
        self._cache: dict[int, pa.Table] = {}
        self._whole: pa.Table | None = None
        if table.largest_block > window_rows:
            warnings.warn(
                f"{table.uri}: a row group of {table.largest_block} rows is larger than train.window_rows "
                f"({window_rows}); a worker holds whole row groups, so memory follows the largest one. "
                "Rewrite the table with smaller row groups to bound it.",
                stacklevel=2,
            )
        self._starts = np.array([b.start for b in table.blocks])

    @property
    def n_rows(self) -> int:
        return self.table.n_rows

    def step(self, epoch: int, lo: int, hi: int) -> tuple[np.ndarray, pa.Table]:
        """Table indices of positions [lo, hi) of the epoch's order, and those rows in that order."""
        order, pool_of = _epoch(self.table, self.seed, epoch, self.window_rows)
        indices = order[lo:hi]
        if self.table.n_rows > self.window_rows:
            keep = set()
            for p in set(pool_of[lo:hi].tolist()):
                keep.update(pools(self.table, self.seed, epoch, self.window_rows)[p])
            for b in [b for b in self._cache if b not in keep]:
                del self._cache[b]
        return indices, self.rows(indices)

    def rows(self, indices: np.ndarray) -> pa.Table:
        """The rows at `indices` (table order), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.table.n_rows <= self.window_rows:
            if self._whole is None:
                self._whole = sort_by_id(dio.read_table(self.table.uri))
            return self._whole.take(pa.array(indices))
        which = np.searchsorted(self._starts, indices, side="right") - 1
        needed = sorted(set(which.tolist()))
        parts = [self._block(b) for b in needed]
        local = {b: i for i, b in enumerate(needed)}
        offsets = np.cumsum([0] + [p.num_rows for p in parts[:-1]])
        positions = [
            offsets[local[b]] + (i - self.table.blocks[b].start)
            for b, i in zip(which.tolist(), indices.tolist(), strict=True)
        ]
        return pa.concat_tables(parts).take(pa.array(positions, type=pa.int64()))

    def _block(self, b: int) -> pa.Table:
        if b not in self._cache:
            self._cache[b] = self.table.read(b)
        return self._cache[b]
