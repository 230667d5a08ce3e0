"""An empty training table fails in the driver, before Ray: naming the table, the method and where the rows went.

Before, `_check_table` checked the table's existence and columns only, so a construct that kept no rows
sent an empty table to every Ray Train worker, which failed and was retried `train.max_failures` times.
The reference pass is the DPO methods' first consumer of the pairs table, so it fails the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pytest

from inbol_ray import schema as S
from inbol_ray.config import Config
from inbol_ray.data import io as dio
from inbol_ray.run_layout import RunLayout
from inbol_ray.train.reference import run_reference_pass
from inbol_ray.train.trainer import _check_table


def _layout(tmp_path: Path) -> RunLayout:
    return RunLayout(root=str(tmp_path / "run"), model_path=str(tmp_path / "model"))


def _write(table: pa.Table, uri: str) -> str:
    dio.write_table(table, dio.join(uri, "part-0.parquet"))
    return uri


def _sft_row() -> dict:
    return {S.ID: "a", S.PROMPT: "What?", S.TARGET: "red", S.TARGET_KIND: "answer"}


def test_empty_sft_table_names_table_method_and_quarantine(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    table = _write(S.SFT.empty_table(), layout.training_table("idk_it"))
    quarantine = dio.write_quarantine([], layout.root, "construct_idk_it")
    with pytest.raises(ValueError, match="has 0 rows") as caught:
        _check_table(table, "idk_it")
    message = str(caught.value)
    assert message.startswith(f"idk_it: training table {table} has 0 rows")
    assert quarantine in message and "'idk_it'" in message


def test_empty_dpo_table_points_at_the_pairs_quarantine(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    table = _write(S.CADPO_PAIRS_WITH_REF.empty_table(), layout.training_table("cadpo"))
    with pytest.raises(ValueError, match=f"^cadpo: training table {re.escape(table)} has 0 rows") as caught:
        _check_table(table, "cadpo")
    assert "construct_cadpo_pairs" in str(caught.value)  # no quarantine file here: named, not a path


def test_a_folder_of_empty_parts_is_empty_too(tmp_path: Path) -> None:
    table = _layout(tmp_path).training_table("sft")
    for part in range(3):
        dio.write_table(S.SFT.empty_table(), dio.join(table, f"part-{part}.parquet"))
    with pytest.raises(ValueError, match="has 0 rows"):
        _check_table(table, "sft")


def test_a_table_with_rows_passes(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    table = _write(S.SFT.empty_table(), layout.training_table("idk_it"))
    dio.write_table(pa.Table.from_pylist([_sft_row()], schema=S.SFT), dio.join(table, "part-1.parquet"))
    _check_table(table, "idk_it")  # one non-empty part is enough


def test_missing_columns_are_still_reported_first(tmp_path: Path) -> None:
    table = _write(S.CADPO_PAIRS.empty_table(), _layout(tmp_path).training_table("cadpo"))
    with pytest.raises(ValueError, match="lacks column.*run run_reference_pass first"):
        _check_table(table, "cadpo")


def test_reference_pass_refuses_empty_pairs_and_leaves_no_table(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    pairs = _write(S.CADPO_PAIRS.empty_table(), layout.table("cadpo_pairs"))
    stale = _write(S.CADPO_PAIRS_WITH_REF.empty_table(), layout.reference_table())  # an older run's
    cfg = Config(run_dir=layout.root)
    with pytest.raises(ValueError, match=f"^reference pass: training table {re.escape(pairs)} has 0 rows"):
        run_reference_pass(cfg, layout, log=lambda line: None)
    assert not dio.exists(stale)  # no table that looks scored is left for training to pick up
