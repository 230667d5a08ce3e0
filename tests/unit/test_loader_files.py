"""Loaders on whole files rather than rows: a file that is wrong as a whole fails with its path and the
field it lacks, the items parquet format keeps its rows as written, `limit` counts input rows, the
pre-flight check lists every missing input before any work starts, and tables and quarantine round-trip.

The files are the committed fixtures under tests/fixtures/ (`broken/` holds the whole-file faults; see
make_fixtures.py); the row-level faults of each format are in test_loaders.py.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from loader_helpers import FIX, VQAV2, by_id, reasons, spec

from inbol_ray.config import DatasetSpec
from inbol_ray.data import io as dio
from inbol_ray.data.loaders import LOADERS, DataFormatError, load, spec_problems
from inbol_ray.schema import (
    ANSWERABLE,
    DATASET,
    ID,
    IMAGE,
    IMAGE_PATH,
    ITEMS,
    METRIC,
    QUARANTINE,
    REASON,
    ROW_KEY,
    SOURCE,
    STAGE,
)


def test_items_parquet_rows_kept_as_they_are() -> None:
    parsed = load(spec("shapes", "items", "items/items.parquet"))
    assert [r[ID] for r in parsed.items] == ["shapes_id_test/0", "shapes_unanswerable/0"]
    assert parsed.items[1][DATASET] == "shapes_unanswerable" and parsed.items[1][ANSWERABLE] is False
    assert reasons(parsed) == {
        "shapes_id_test/1": "field 'metric' ('bogus') is not one of ['vqa_soft', 'exact', 'mc_letter']"
    }
    assert parsed.quarantine[0][DATASET] == "shapes_id_test"


def test_limit_counts_input_rows() -> None:
    limited = load(spec("vqav2", "vqav2", VQAV2.path, VQAV2.images, limit=2))
    assert limited.n_input == 2
    assert load(spec("mmmu", "mmmu", "mmmu", limit=3)).n_input == 3
    assert load(spec("oven", "oven", "oven/oven_entity_val.jsonl", "oven/oven_images", limit=2)).n_input == 2


# --- whole-file problems ------------------------------------------------------------------------------


def test_malformed_json_names_the_file() -> None:
    path = FIX / "broken/aokvqa_v1p0_val.json"
    with pytest.raises(DataFormatError, match=rf"^{path}: malformed JSON"):
        load(DatasetSpec(name="a", format="aokvqa", path=str(path), images=str(FIX / "aokvqa/val2017")))


def test_renamed_field_names_the_file_and_the_field() -> None:
    path = FIX / "broken/gqa_renamed_questions.json"
    with pytest.raises(DataFormatError, match=r"gqa_renamed_questions\.json: missing field 'imageId'"):
        load(DatasetSpec(name="g", format="gqa", path=str(path), images=str(FIX / "gqa/images")))


def test_missing_tsv_column_names_the_file_and_the_field() -> None:
    path = FIX / "broken/mmbench_no_answer.tsv"
    with pytest.raises(DataFormatError, match=r"mmbench_no_answer\.tsv: missing field\(s\) \['answer'\]"):
        load(DatasetSpec(name="m", format="mmbench", path=str(path)))


def test_wrong_top_level(tmp_path: Path) -> None:
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text('{"qs": []}')
    with pytest.raises(DataFormatError, match="missing field 'questions' at the top level"):
        load(
            DatasetSpec(
                name="v", format="vqav2", path=str(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json")
            )
        )
    (tmp_path / "vizwiz.json").write_text('{"image": "a.jpg"}')
    with pytest.raises(DataFormatError, match="top level must be a JSON list"):
        load(DatasetSpec(name="z", format="vizwiz", path=str(tmp_path / "vizwiz.json")))


def test_items_parquet_text_only_rows_need_text_only(tmp_path: Path) -> None:
    rows = load(spec("shapes", "items", "items/items.parquet")).items
    rows[0] = {**rows[0], IMAGE: None, IMAGE_PATH: None}
    dio.write_table(pa.Table.from_pylist(rows, schema=ITEMS), str(tmp_path / "x.parquet"))
    default = load(DatasetSpec(name="s", format="items", path=str(tmp_path / "x.parquet"), split="ood_test"))
    assert reasons(default)[rows[0][ID]].startswith("missing field 'image' (and 'image_path'; set text_only")
    kept = load(DatasetSpec(name="s", format="items", path=str(tmp_path / "x.parquet"), split="ood_test",
                            text_only=True))  # fmt: skip
    assert by_id(kept.items)[rows[0][ID]][IMAGE] is None and not kept.quarantine


def test_items_parquet_with_a_missing_column(tmp_path: Path) -> None:
    table = pa.Table.from_pylist(load(spec("shapes", "items", "items/items.parquet")).items, schema=ITEMS)
    dio.write_table(table.drop_columns([METRIC]), str(tmp_path / "x.parquet"))
    with pytest.raises(DataFormatError, match=r"x\.parquet: missing field\(s\) \['metric'\]"):
        load(DatasetSpec(name="s", format="items", path=str(tmp_path / "x.parquet")))


# --- pre-flight checks ---------------------------------------------------------------------------------


def test_spec_problems_lists_every_missing_input() -> None:
    assert spec_problems(VQAV2) == []
    missing = DatasetSpec(name="v", format="vqav2", path="/nope/v2_OpenEnded_mscoco_val2014_questions.json")
    assert spec_problems(missing) == [
        "v (format vqav2): path not found: /nope/v2_OpenEnded_mscoco_val2014_questions.json",
        "v (format vqav2): annotations not found: /nope/v2_mscoco_val2014_annotations.json",
        "v (format vqav2): 'images' is not set",
    ]
    assert spec_problems(DatasetSpec(name="x", format="coco", path="/x")) == [
        f"x (format coco): unknown format; known: {', '.join(LOADERS)}"
    ]
    assert spec_problems(spec("mmbench", "mmbench", "mmbench/MMBench_DEV_EN.tsv")) == []  # no image folder


# --- io -------------------------------------------------------------------------------------------------


def test_table_roundtrip_and_quarantine(tmp_path: Path) -> None:
    table = pa.table({"a": [1, 2, 3]})
    dio.write_table(table, str(tmp_path / "t" / "x.parquet"))
    assert dio.read_table(str(tmp_path / "t")).equals(table)  # a folder of shards reads as one table
    assert dio.read_table(f"file://{tmp_path}/t/x.parquet", columns=["a"]).equals(table)
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["x.parquet"]  # no temp file left behind

    rows = [{SOURCE: "f.json", ROW_KEY: "d:1", REASON: "missing field 'x'", DATASET: "d"}]
    uri = dio.write_quarantine(rows, str(tmp_path), "prepare")
    dio.write_quarantine([], str(tmp_path), "sample")
    got = dio.read_quarantine(str(tmp_path))
    assert uri == f"{tmp_path}/quarantine/prepare.parquet"
    assert got.schema == QUARANTINE and got.to_pylist() == [
        {SOURCE: "f.json", ROW_KEY: "d:1", STAGE: "prepare", REASON: "missing field 'x'"}
    ]
    assert dio.read_quarantine(str(tmp_path / "nothing")).num_rows == 0
