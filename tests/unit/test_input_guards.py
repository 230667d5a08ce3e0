"""Early, clear failures on hostile or broken input files, without Ray.

Image paths: every loader builds image locations from values in its annotation file, so a value that climbs
out of the images folder (`..`), names another root (an absolute path, a URI) or hides a NUL byte must
quarantine its row, with the field and the value in the reason, while the file's other rows load.
`unanswerable_jsonl` and `items` document absolute paths and URIs as valid values: those stay, `..` not.

Long lines: a JSONL reader buffers one line, so a file with no newline must stop at `data.max_line_bytes`
with an error naming the file, the line and the setting, having held about the limit, not the file.
"""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from inbol_ray.config import DatasetSpec
from inbol_ray.data.loaders import DataFormatError, load, load_streaming
from inbol_ray.data.loaders.common import image_location, iter_lines, path_problem
from inbol_ray.schema import ID, IMAGE_PATH, ITEMS, REASON, ROW_KEY

ESCAPE = "../../etc/passwd"


def _dump(path: Path, obj: object) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _spec(name: str, fmt: str, path: str, images: Path | None = None) -> DatasetSpec:
    return DatasetSpec(name=name, format=fmt, path=path, images=str(images) if images else "", split="val")


def _reasons(parsed) -> dict[str, str]:
    return {row[ROW_KEY]: row[REASON] for row in parsed.quarantine}


def _paths(parsed) -> dict[str, str]:
    return {row[ID]: row[IMAGE_PATH] for row in parsed.items}


# --- image paths, per loader ----------------------------------------------------------------------------


def test_scienceqa_image_and_problem_id_stay_under_images(tmp_path: Path) -> None:
    problem = {"question": "Which?", "choices": ["a", "b"], "answer": 0, "split": "test"}
    path = _dump(
        tmp_path / "problems.json",
        {
            "1": {**problem, "image": "image.png"},
            "2": {**problem, "image": ESCAPE},
            "../3": {**problem, "image": "image.png"},
            "4": {**problem, "image": 7},  # used to fail deep in path joining
        },
    )
    parsed = load(_spec("sqa", "scienceqa", path, tmp_path / "images"))
    assert _paths(parsed) == {"sqa:1": f"{tmp_path}/images/test/1/image.png"}
    assert _reasons(parsed) == {
        "sqa:2": f"field 'image' ('{ESCAPE}') has a '..' component (a path may not climb out of its folder)",
        "sqa:../3": "problem id ('../3') has a '..' component (a path may not climb out of its folder)",
        "sqa:4": "field 'image' must be a string",
    }


def test_oven_image_id_stays_under_images(tmp_path: Path) -> None:
    row = {"question": "What is this?", "entity_text": "Lion"}
    path = _jsonl(
        tmp_path / "oven_entity_val.jsonl",
        [
            {**row, "data_id": "bad", "image_id": ESCAPE},  # first, so it would pick the layout probe
            {**row, "data_id": "good", "image_id": "oven_01000001"},
        ],
    )
    parsed = load(_spec("oven", "oven", path, tmp_path / "oven_images"))
    assert _paths(parsed) == {"oven:good": f"{tmp_path}/oven_images/01/oven_01000001.jpg"}
    assert _reasons(parsed) == {
        "oven:bad": f"field 'image_id' ('{ESCAPE}') has a '..' component (a path may not climb out of its folder)"
    }


def test_gqa_image_id_stays_under_images(tmp_path: Path) -> None:
    path = _dump(
        tmp_path / "testdev_balanced_questions.json",
        {
            "q1": {"imageId": "n1", "question": "What?", "answer": "red"},
            "q2": {"imageId": "/etc/passwd", "question": "What?", "answer": "red"},
        },
    )
    parsed = load(_spec("gqa", "gqa", path, tmp_path / "images"))
    assert _paths(parsed) == {"gqa:q1": f"{tmp_path}/images/n1.jpg"}
    assert _reasons(parsed) == {
        "gqa:q2": "field 'imageId' ('/etc/passwd') is an absolute path, not a path inside the images folder"
    }


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        (ESCAPE, "has a '..' component"),
        ("val/../../x.jpg", "has a '..' component"),
        ("..\\..\\x.jpg", "has a '..' component"),
        ("/etc/passwd", "is an absolute path"),
        ("C:\\x.jpg", "is an absolute path"),
        ("s3://other-bucket/x.jpg", "is a URI"),
        ("x.jpg\x00.png", "holds a NUL byte"),
    ],
)
def test_vizwiz_image_stays_under_images(tmp_path: Path, image: str, problem: str) -> None:
    row = {"question": "What?", "answers": [{"answer": "red"}] * 10, "answerable": 1}
    path = _dump(tmp_path / "val.json", [{**row, "image": "VizWiz_val_1.jpg"}, {**row, "image": image}])
    parsed = load(_spec("vizwiz", "vizwiz", path, tmp_path / "val"))
    assert _paths(parsed) == {"vizwiz:VizWiz_val_1.jpg": f"{tmp_path}/val/VizWiz_val_1.jpg"}
    assert _reasons(parsed) == {f"vizwiz:{image}": f"field 'image' ({image!r}) {problem}" + _tail(problem)}


def _tail(problem: str) -> str:
    """The rest of each reason, so the test pins the whole text a user reads."""
    return {
        "has a '..' component": " (a path may not climb out of its folder)",
        "is an absolute path": ", not a path inside the images folder",
        "is a URI": ", not a path inside the images folder",
        "holds a NUL byte": "",
    }[problem]


def test_vqav2_subtype_that_leaves_the_folder_is_a_file_error(tmp_path: Path) -> None:
    """`data_subtype` names every row's image file, so a bad one is the file's fault, not one row's."""
    questions = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    _dump(
        questions,
        {"data_subtype": "../x", "questions": [{"question_id": 1, "image_id": 1, "question": "What?"}]},
    )
    _dump(
        tmp_path / "v2_mscoco_val2014_annotations.json",
        {"annotations": [{"question_id": 1, "answers": [{"answer": "a"}], "answer_type": "other"}]},
    )
    with pytest.raises(
        DataFormatError,
        match=rf"^{re.escape(str(questions))}: field 'data_subtype' \('\.\./x'\) has a '\.\.'",
    ):
        load(_spec("vqav2", "vqav2", str(questions), tmp_path / "val2014"))


def test_unanswerable_jsonl_keeps_absolute_paths_and_uris_but_not_dotdot(tmp_path: Path) -> None:
    row = {"question": "What brand is the car?"}
    path = _jsonl(
        tmp_path / "u.jsonl",
        [
            {**row, "id": "rel", "image": "images/u1.png"},
            {**row, "id": "abs", "image": "/data/coco/x.jpg"},  # documented: an absolute path
            {**row, "id": "uri", "image": "s3://bucket/x.jpg"},  # documented: a URI
            {**row, "id": "up", "image": "../secret.png"},
            {**row, "id": "abs_up", "image": "/data/coco/../../etc/passwd"},
        ],
    )
    parsed = load(_spec("u", "unanswerable_jsonl", path))
    assert _paths(parsed) == {
        "u:rel": f"{tmp_path}/images/u1.png",
        "u:abs": "/data/coco/x.jpg",
        "u:uri": "s3://bucket/x.jpg",
    }
    dotdot = "has a '..' component (a path may not climb out of its folder)"
    assert _reasons(parsed) == {
        "u:up": f"field 'image' ('../secret.png') {dotdot}",
        "u:abs_up": f"field 'image' ('/data/coco/../../etc/passwd') {dotdot}",
    }


def test_items_parquet_keeps_stored_locations_but_not_dotdot(tmp_path: Path) -> None:
    def row(row_id: str, image_path: str) -> dict:
        return {
            "id": row_id,
            "dataset": "d",
            "split": "id_test",
            "image": None,
            "image_path": image_path,
            "question": "What?",
            "answers": ["a"],
            "choices": None,
            "metric": "exact",
            "answerable": True,
            "category": "c",
            "source": "s",
        }

    path = tmp_path / "items.parquet"
    rows = [row("abs", "/data/coco/x.jpg"), row("uri", "s3://b/x.jpg"), row("up", "imgs/../../x.jpg")]
    pq.write_table(pa.Table.from_pylist(rows, schema=ITEMS), path)
    parsed = load(_spec("d", "items", str(path)))
    assert _paths(parsed) == {"abs": "/data/coco/x.jpg", "uri": "s3://b/x.jpg"}
    assert _reasons(parsed) == {
        "up": "field 'image_path' ('imgs/../../x.jpg') has a '..' component (a path may not climb out of its folder)"
    }


def test_image_location_refuses_what_a_loader_forgot_to_check(tmp_path: Path) -> None:
    assert image_location(str(tmp_path), "a", "b.jpg") == f"{tmp_path}/a/b.jpg"
    with pytest.raises(ValueError, match="has a '..' component"):
        image_location(str(tmp_path), "a", ESCAPE)


@pytest.mark.parametrize("name", ["x.jpg", "a..b.jpg", "...", "sub/./x.jpg", "COCO_val2014_000000000001.jpg"])
def test_ordinary_names_are_not_refused(name: str) -> None:
    assert path_problem(name) == ""


# --- over-long JSONL lines ------------------------------------------------------------------------------


def test_a_file_without_newlines_stops_at_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "one_line.jsonl"
    path.write_bytes(b"x" * 5_000)
    with pytest.raises(
        DataFormatError, match=rf"^{re.escape(str(path))}: line 1 is longer than data.max_line_bytes \(1,024"
    ):
        list(iter_lines(str(path), 1024, block_bytes=256))


def test_the_error_names_the_long_line_and_earlier_lines_were_read(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"a\n" + b"b" * 1024 + b"\n" + b"c" * 1025 + b"\nd\n")
    lines = iter_lines(str(path), 1024, block_bytes=100)
    assert [next(lines), next(lines)] == [b"a", b"b" * 1024]  # a line of exactly the limit is fine
    with pytest.raises(DataFormatError, match="line 3 is longer than data.max_line_bytes"):
        next(lines)


@pytest.mark.parametrize("block", [1, 7, 100, 1 << 18])
def test_lines_across_blocks_come_back_whole(tmp_path: Path, block: int) -> None:
    data = b"first\n\n" + b"y" * 300 + b"\nlast without newline"
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    assert list(iter_lines(str(path), 1024, block_bytes=block)) == data.split(b"\n")


def test_reading_a_huge_line_holds_about_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    path.write_bytes(b"z" * 16_000_000)  # 16 MB, no newline
    tracemalloc.start()
    try:
        with pytest.raises(DataFormatError, match="line 1"):
            list(iter_lines(str(path), 1024))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak  # a block (256 KiB) and its split, never the file


def test_loaders_take_the_limit_from_the_caller(tmp_path: Path) -> None:
    row = {"data_id": "d", "image_id": "oven_01", "question": "q" * 2_000, "entity_text": "x"}
    path = _jsonl(tmp_path / "oven_entity_val.jsonl", [row])
    spec = _spec("oven", "oven", path, tmp_path / "images")
    assert len(load(spec).items) == 1  # the default limit (64 MB) reads it
    with pytest.raises(
        DataFormatError, match=rf"^{re.escape(path)}: line 1 is longer than data.max_line_bytes"
    ):
        load(spec, max_line_bytes=1024)
    with pytest.raises(DataFormatError, match="raise data.max_line_bytes"):
        load_streaming(spec, lambda rows: None, lambda rows: None, max_line_bytes=1024)


def test_prepare_takes_the_limit_from_the_config(tmp_path: Path) -> None:
    """`data.max_line_bytes` reaches the readers prepare runs (`read_sources`), before Ray starts."""
    from inbol_ray.config import Config, DataConfig, DatasetSpec
    from inbol_ray.data.prepare import read_sources

    path = tmp_path / "oven_entity_val.jsonl"
    row = {"data_id": "oven_entity_val_1", "image_id": "oven_1", "question": "what is this?" + " x" * 1000,
           "entity_text": "Eiffel Tower", "data_split": "val_entity_seen"}  # fmt: skip
    path.write_text(json.dumps(row) + "\n")
    spec = DatasetSpec(name="oven", format="oven", path=str(path), images=str(tmp_path), split="train")
    data = DataConfig(source="files", datasets=[spec], max_line_bytes=1024)
    with pytest.raises(DataFormatError, match=r"line 1 is longer than data.max_line_bytes \(1,024 bytes\)"):
        read_sources(Config(run_dir=str(tmp_path / "run"), data=data))
    read_sources(Config(run_dir=str(tmp_path / "run"), data=DataConfig(source="files", datasets=[spec])))
