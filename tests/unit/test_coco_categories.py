"""COCO categories for the mismatch recipe's absence evidence (inbol_ray.data.coco_categories)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inbol_ray.data.coco_categories import (
    CATEGORIES,
    categories_of,
    image_id_from_path,
    iter_top_level,
    plural,
    read_instances,
    write_instances,
)


def test_the_80_categories() -> None:
    assert len(CATEGORIES) == 80 and min(CATEGORIES) == 1 and max(CATEGORIES) == 90
    assert CATEGORIES[1] == "person" and CATEGORIES[58] == "hot dog" and CATEGORIES[90] == "toothbrush"


@pytest.mark.parametrize(
    ("terms", "cats", "unmapped"),
    [
        ({"man"}, {1}, set()),  # synonym
        ({"people"}, {1}, set()),  # irregular plural
        ({"buses"}, {6}, set()),  # regular plural
        ({"knives"}, {49}, set()),
        ({"red", "bus"}, {6}, {"red"}),  # the adjective stays for the text rule
        ({"train", "station"}, {7}, {"station"}),  # "station" still needs to be rare
        ({"hot", "dogs"}, {18, 58}, set()),  # a multi-word name (and "dogs" itself: both must be absent)
        ({"cell", "phone"}, {77}, set()),
        ({"bike"}, {2, 4}, set()),  # either: both must be absent
        ({"skies"}, set(), {"skies"}),  # no general de-pluraliser: "skies" is no ski
        ({"table"}, set(), {"table"}),  # a coffee table is no dining table
        ({"phone"}, set(), {"phone"}),  # a landline is no cell phone
        ({"keyboard"}, set(), {"keyboard"}),  # a piano's keys
        ({"glove"}, set(), {"glove"}),
        ({"building"}, set(), {"building"}),
    ],
)
def test_referent_words_to_categories(terms: set[str], cats: set[int], unmapped: set[str]) -> None:
    assert categories_of(terms) == (frozenset(cats), frozenset(unmapped))


def test_plurals() -> None:
    assert [plural(w) for w in ("bus", "pony", "knife", "sandwich", "ski", "toy")] == [
        "buses", "ponies", "knives", "sandwiches", "skis", "toys",
    ]  # fmt: skip


def test_image_ids_from_coco_file_names() -> None:
    assert image_id_from_path("/data/coco/train2014/COCO_train2014_000000123456.jpg") == 123456
    assert image_id_from_path("s3://b/coco/val2017/000000000042.jpg") == 42
    assert image_id_from_path("/data/oven/oven_01000001.jpg") is None
    assert image_id_from_path(None) is None


def instances_file(path: Path, **dump: object) -> Path:
    """A small instance file shaped like COCO's: info, licenses, images, annotations (polygon and crowd RLE
    segmentations, braces inside strings), categories."""
    body = {
        "info": {"description": "a } and a { in a string", "year": 2014},
        "licenses": [{"id": 1, "name": "x"}],
        "images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg"} for i in (5, 7, 123456789)],
        "annotations": [
            {"segmentation": [[1.5, 2.5, 3.0, 4.0]], "area": 3.0, "iscrowd": 0, "image_id": 5,
             "bbox": [1, 2, 3, 4], "category_id": 18, "id": 1},
            {"segmentation": {"counts": [1, 2, 3], "size": [4, 5]}, "iscrowd": 1, "image_id": 5,
             "category_id": 90, "id": 2},
            {"id": 3, "category_id": 1, "image_id": 123456789},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"},
                       {"id": 90, "name": "toothbrush"}],
    }  # fmt: skip
    path.write_text(json.dumps(body, **dump))
    return path


@pytest.mark.parametrize("chunk_bytes", [1, 2, 7, 64, 1 << 20])
@pytest.mark.parametrize("dump", [{}, {"indent": 2, "sort_keys": True}])
def test_read_instances_streams_any_layout(tmp_path: Path, chunk_bytes: int, dump: dict) -> None:
    found = read_instances(str(instances_file(tmp_path / "i.json", **dump)), chunk_bytes=chunk_bytes)
    assert found.categories(5) == {18, 90}
    assert found.categories(7) == frozenset()  # in the file, nothing boxed: every category absent
    assert found.categories(123456789) == {1}
    assert found.categories(8) is None and found.categories(None) is None  # not in the file: no evidence


def test_iter_top_level_yields_only_the_named_arrays(tmp_path: Path) -> None:
    path = str(instances_file(tmp_path / "i.json"))
    keys = [key for key, _ in iter_top_level(path, {"images", "categories"}, chunk_bytes=3)]
    assert keys == ["images"] * 3 + ["categories"] * 3


def test_broken_instances_files_fail_clearly(tmp_path: Path) -> None:
    (tmp_path / "cut.json").write_text('{"images": [{"id": 1}, {"id": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_instances(str(tmp_path / "cut.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected '{'"):
        read_instances(str(tmp_path / "list.json"))


def test_written_instance_files_read_back(tmp_path: Path) -> None:
    uri = write_instances(str(tmp_path / "a" / "instances_train2014.json"), [3, 1, 2], {2: [18, 1]})
    found = read_instances(uri)
    assert [found.categories(i) for i in (1, 2, 3, 4)] == [frozenset(), {1, 18}, frozenset(), None]
    assert json.loads(Path(uri).read_text())["images"][0]["file_name"] == "COCO_train2014_000000000003.jpg"
