"""Training rows by pools of row groups: a permutation per epoch, the old full shuffle for small tables,
bounded memory for big ones, the right rows for every index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from inbol_ray.config import TrainConfig
from inbol_ray.train.loop import step_positions, steps_per_epoch
from inbol_ray.train.table_rows import RowReader, epoch_order, open_blocks, pools


def _table(tmp_path: Path, n: int, group: int, files: int = 2, shuffled: bool = False) -> str:
    ids = [f"row-{i:07d}" for i in range(n)]
    table = pa.table({"id": ids, "x": np.arange(n)})
    if shuffled:
        table = table.take(pa.array(np.random.default_rng(9).permutation(n)))
    folder = tmp_path / "table"
    folder.mkdir()
    cuts = np.linspace(0, n, files + 1).astype(int)
    for f in range(files):
        pq.write_table(
            table.slice(cuts[f], cuts[f + 1] - cuts[f]), folder / f"part-{f}.parquet", row_group_size=group
        )
    return str(folder)


def test_small_table_is_one_pool_with_the_classic_shuffle_in_id_order(tmp_path: Path) -> None:
    uri = _table(tmp_path, 500, group=64, shuffled=True)
    blocks = open_blocks(uri)
    assert blocks.n_rows == 500 and len(pools(blocks, 0, 3, 1000)) == 1
    order = epoch_order(blocks, 0, 3, 1000)
    assert np.array_equal(order, np.random.default_rng([0, 3]).permutation(500))  # what the loop always did
    reader = RowReader(blocks, 0, 1000)
    _, rows = reader.step(3, 0, 10)
    assert rows["x"].to_pylist() == order[:10].tolist()  # table sorted by id: x == position in id order


def test_big_table_pools_bound_what_a_worker_holds(tmp_path: Path) -> None:
    n, group, window, batch = 20_000, 500, 2_000, 64
    uri = _table(tmp_path, n, group=group, files=3)
    blocks = open_blocks(uri)
    assert blocks.n_rows == n and len(blocks.blocks) >= n // group  # files cut some groups short
    cfg = TrainConfig(batch_size=batch, window_rows=window, seed=5)
    reader = RowReader(blocks, cfg.seed, window)
    seen = []
    for step in range(steps_per_epoch(n, batch)):
        epoch, lo, hi = step_positions(n, cfg, step)
        indices, rows = reader.step(epoch, lo, hi)
        assert rows["x"].to_pylist() == indices.tolist()  # the right row for every index (x == position)
        held = sum(t.num_rows for t in reader._cache.values())
        assert held <= 2 * window + 2 * group, held
        seen.extend(indices.tolist())
    assert len(seen) == len(set(seen)) == (n // batch) * batch  # an epoch: no row twice, tail dropped
    again = epoch_order(open_blocks(uri), 5, 0, window)
    assert np.array_equal(again, epoch_order(blocks, 5, 0, window))  # a pure function of (seed, epoch)
    assert not np.array_equal(epoch_order(blocks, 5, 1, window), again)
    # batches mix the table: a pool's blocks come from all over it
    first_pool = pools(blocks, 5, 0, window)[0]
    assert max(first_pool) - min(first_pool) > len(first_pool)


def test_a_huge_row_group_is_read_with_a_warning(tmp_path: Path) -> None:
    uri = _table(tmp_path, 5_000, group=5_000, files=1)
    with pytest.warns(UserWarning, match="larger than train.window_rows"):
        reader = RowReader(open_blocks(uri), 0, 1_000)
    _, rows = reader.step(0, 0, 8)
    assert rows.num_rows == 8


def test_empty_table_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string())}), path)
    with pytest.raises(ValueError, match="empty"):
        open_blocks(str(path))
