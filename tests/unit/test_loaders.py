"""Loaders without Ray: field mapping, metrics, answerability and quarantine reasons per published format.

The fixtures under tests/fixtures/ are hand-written in each publisher's layout (see make_fixtures.py);
every deliberate row-level fault in them is asserted here by row key and reason. Files wrong as a whole,
the items parquet format, `limit` and the pre-flight checks are in test_loader_files.py.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from loader_helpers import FIX, VQAV2, by_id, reasons, spec

from inbol_ray.config import ConfigError, DatasetSpec
from inbol_ray.data.loaders import DataFormatError, dataset_names, load
from inbol_ray.data.loaders.training import vqav2_annotations_path
from inbol_ray.grading import grade, vqa_accuracy
from inbol_ray.schema import (
    ANSWERABLE,
    ANSWERS,
    CATEGORY,
    CHOICES,
    DATASET,
    ID,
    IMAGE,
    IMAGE_PATH,
    ITEMS,
    METRIC,
    QUESTION,
    ROW_KEY,
    SOURCE,
    SPLIT,
)


def test_every_item_fits_the_items_schema() -> None:
    for s in [VQAV2, spec("mmbench", "mmbench", "mmbench/MMBench_DEV_EN.tsv"), spec("mmmu", "mmmu", "mmmu")]:
        table = pa.Table.from_pylist(load(s).items, schema=ITEMS)
        assert table.num_rows > 0
        assert table.column(ID).null_count == 0


# --- training sets -------------------------------------------------------------------------------------


def test_vqav2_joins_questions_and_annotations() -> None:
    parsed = load(VQAV2)
    items = by_id(parsed.items)
    assert sorted(items) == ["vqav2:1001", "vqav2:1002", "vqav2:2001", "vqav2:3001"]
    row = items["vqav2:1001"]
    assert row[METRIC] == "vqa_soft" and row[ANSWERABLE] is True and row[CHOICES] is None
    assert len(row[ANSWERS]) == 10 and row[ANSWERS].count("dark red") == 3  # duplicates kept
    assert row[CATEGORY] == "other" and items["vqav2:1002"][CATEGORY] == "yes/no"
    assert row[IMAGE] is None
    assert row[IMAGE_PATH] == str(FIX / "vqav2/val2014/COCO_val2014_000000000001.jpg")
    assert row[SOURCE].endswith("v2_OpenEnded_mscoco_val2014_questions.json")
    assert row[DATASET] == "vqav2" and row[SPLIT] == "train"
    assert reasons(parsed) == {
        "vqav2:4001": f"no annotation with this 'question_id' in {FIX}/vqav2/v2_mscoco_val2014_annotations.json",
        "vqav2:5001": "missing field 'question'",
    }


def test_vqav2_annotation_file_name_follows_the_release() -> None:
    assert vqav2_annotations_path("s3://b/vqa/v2_OpenEnded_mscoco_train2014_questions.json") == (
        "s3://b/vqa/v2_mscoco_train2014_annotations.json"
    )
    with pytest.raises(DataFormatError, match="not a VQAv2 questions file name"):
        vqav2_annotations_path("/data/questions.json")


def test_scienceqa_image_questions_of_one_split() -> None:
    parsed = load(spec("scienceqa", "scienceqa", "scienceqa/problems.json", "scienceqa/images"))
    items = by_id(parsed.items)
    assert sorted(items) == ["scienceqa:1", "scienceqa:5"]  # 4 is a test problem; 5's image is broken later
    row = items["scienceqa:1"]
    assert row[QUESTION] == "Context: Look at the picture.\nWhich colour is the square?"
    assert row[CHOICES] == ["red", "green", "blue"] and row[ANSWERS] == ["B"] and row[METRIC] == "mc_letter"
    assert row[CATEGORY] == "natural science"
    assert row[IMAGE_PATH] == str(FIX / "scienceqa/images/train/1/image.png")
    assert reasons(parsed) == {
        "scienceqa:2": "skipped: field 'image' is null (text-only question; set text_only: true to load it)",
        "scienceqa:3": "field 'answer' (5) is not an index into 3 choices",
    }
    test_split = load(
        spec("scienceqa", "scienceqa", "scienceqa/problems.json", "scienceqa/images", split="id_test")
    )
    assert [r[ID] for r in test_split.items] == ["scienceqa:4"] and list(reasons(test_split)) == [
        "scienceqa:6"
    ]


def test_scienceqa_text_only_problems_on_request() -> None:
    """`text_only: true` keeps problems without an image as items with no image (evaluation splits only)."""
    parsed = load(spec("scienceqa", "scienceqa", "scienceqa/problems.json", "scienceqa/images", split="id_test",
                       text_only=True))  # fmt: skip
    items = by_id(parsed.items)
    assert sorted(items) == ["scienceqa:4", "scienceqa:6"] and not parsed.quarantine
    row = items["scienceqa:6"]
    assert row[IMAGE] is None and row[IMAGE_PATH] is None and row[ANSWERS] == ["B"]
    assert row[QUESTION] == "Which word names a colour?" and row[CHOICES] == ["square", "green", "three"]
    with pytest.raises(ConfigError, match="text_only is for evaluation splits"):
        spec("scienceqa", "scienceqa", "scienceqa/problems.json", split="train", text_only=True)


def test_oven_entity_answers_and_malformed_lines() -> None:
    parsed = load(spec("oven", "oven", "oven/oven_entity_val.jsonl", "oven/oven_images"))
    items = by_id(parsed.items)
    row = items["oven:oven_entity_val_00000001"]
    assert row[ANSWERS] == ["Eiffel Tower"] and row[METRIC] == "exact" and row[CATEGORY] == "val_entity_seen"
    assert row[IMAGE_PATH] == str(FIX / "oven/oven_images/01/oven_01000001.jpg")  # sharded layout found
    assert items["oven:oven_entity_val_00000004"][ANSWERS] == ["Lion"]
    got = reasons(parsed)
    assert got["oven:line2"].startswith("malformed JSON on line 2")
    assert got["oven:oven_entity_val_00000003"] == "missing field 'entity_text'"
    assert len(got) == 2


def test_oven_flat_image_folder(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "oven_05000001.png").write_bytes(b"x")
    row = {"data_id": "d1", "image_id": "oven_05000001", "question": "what?", "entity_text": "Lion"}
    (tmp_path / "o.jsonl").write_text(json.dumps(row) + "\n")
    parsed = load(
        DatasetSpec(name="o", format="oven", path=str(tmp_path / "o.jsonl"), images=str(tmp_path / "img"))
    )
    assert parsed.items[0][IMAGE_PATH] == str(tmp_path / "img" / "oven_05000001.png")


# --- evaluation sets -----------------------------------------------------------------------------------


def test_aokvqa_direct_answers_and_multiple_choice() -> None:
    da = load(spec("aokvqa", "aokvqa", "aokvqa/aokvqa_v1p0_val.json", "aokvqa/val2017", split="ood_test"))
    items = by_id(da.items)
    row = items["aokvqa:22MexNkBPpdZGX6sxbxVBH"]
    assert row[METRIC] == "vqa_soft" and len(row[ANSWERS]) == 10 and row[CHOICES] is None
    assert row[CATEGORY] == "direct_answer" and row[SPLIT] == "ood_test"
    assert items["aokvqa:2PmEKb6C5xfSo9UkxCFdLa"][CATEGORY] == "direct_answer_difficult"
    assert row[IMAGE_PATH] == str(FIX / "aokvqa/val2017/000000000010.jpg")
    assert reasons(da) == {"aokvqa:3BadRowxxxxxxxxxxxxxxx": "field 'direct_answers' must be a non-empty list"}

    mc = load(spec("aokvqa_mc", "aokvqa_mc", "aokvqa/aokvqa_v1p0_val.json", "aokvqa/val2017"))
    row = by_id(mc.items)["aokvqa_mc:2PmEKb6C5xfSo9UkxCFdLa"]
    assert row[METRIC] == "mc_letter" and row[ANSWERS] == ["C"] and row[CHOICES][2] == "rain"
    assert reasons(mc) == {
        "aokvqa_mc:3BadRowxxxxxxxxxxxxxxx": "field 'correct_choice_idx' (7) is not an index into 4 choices"
    }


@pytest.mark.parametrize("matches", range(11))
def test_aokvqa_right_calls_agree_with_the_official_da_formula(matches: int) -> None:
    """parse_aokvqa's claim: at vqa_correct_at 0.5 our leave-one-out VQA accuracy and A-OKVQA's own
    min(1, matches / 3) call the same responses right (at least 2 of the 10 annotators)."""
    answers = ["cab"] * matches + ["train"] * (10 - matches)
    official = min(1.0, sum(a == "cab" for a in answers) / 3.0)
    assert (vqa_accuracy("cab", answers) >= 0.5) == (official >= 0.5) == (matches >= 2)
    assert grade("Cab.", answers, "vqa_soft", correct_at=0.5) == (matches >= 2)  # normalised response


def test_oven_is_graded_by_exact_title_only() -> None:
    """parse_oven's claim: articles and case do not matter, but no aliases or title variants count."""
    oven = by_id(load(spec("oven", "oven", "oven/oven_entity_val.jsonl", "oven/oven_images")).items)
    row = next(iter(oven.values()))
    (title,) = row[ANSWERS]
    assert row[METRIC] == "exact"
    assert grade(f"The {title.upper()}.", row[ANSWERS], row[METRIC])
    assert grade("Eiffel Tower", ["the Eiffel Tower"], "exact")
    assert not grade("Mercury", ["Mercury (planet)"], "exact")  # OVEN's entity linking would accept it


def test_gqa() -> None:
    parsed = load(spec("gqa", "gqa", "gqa/testdev_balanced_questions.json", "gqa/images"))
    items = by_id(parsed.items)
    assert items["gqa:20968379"][ANSWERS] == ["red"] and items["gqa:20968379"][METRIC] == "exact"
    assert items["gqa:20968380"][CATEGORY] == "verify"
    assert items["gqa:20968380"][IMAGE_PATH] == str(FIX / "gqa/images/n2.jpg")
    assert reasons(parsed) == {"gqa:20968381": "missing field 'answer'"}


def test_mmmu_single_image_multiple_choice_only() -> None:
    parsed = load(spec("mmmu", "mmmu", "mmmu"))
    items = by_id(parsed.items)
    assert sorted(items) == [
        "mmmu:validation_Accounting_1",
        "mmmu:validation_Accounting_4",
        "mmmu:validation_Art_Theory_1",
    ]
    row = items["mmmu:validation_Accounting_1"]
    assert (
        row[CHOICES] == ["A cat", "A dog", "A bird"] and row[ANSWERS] == ["B"] and row[METRIC] == "mc_letter"
    )
    assert row[CATEGORY] == "Accounting" and row[IMAGE][:4] == b"\x89PNG" and row[IMAGE_PATH] is None
    assert items["mmmu:validation_Art_Theory_1"][CATEGORY] == "Art_Theory"  # image referenced in an option
    assert reasons(parsed) == {
        "mmmu:validation_Accounting_2": "skipped: question_type 'open' (only multiple-choice is loaded)",
        "mmmu:validation_Accounting_3": "skipped: 2 images referenced in question/options (only single-image questions)",
    }
    assert not any("dev_" in key for key in items)  # a folder means its validation-*.parquet files only
    one_file = load(spec("mmmu", "mmmu", "mmmu/Accounting/dev-00000-of-00001.parquet"))
    assert [r[ID] for r in one_file.items] == ["mmmu:dev_Accounting_1"]


def test_mmbench_tsv() -> None:
    parsed = load(spec("mmbench", "mmbench", "mmbench/MMBench_DEV_EN.tsv"))
    items = by_id(parsed.items)
    row = items["mmbench:0"]
    # the hint bare before the question, as LLaVA-1.5's llava/eval/model_vqa_mmbench.py writes it
    assert row[QUESTION] == "The square is in the middle.\nWhat colour is the square?"
    assert row[CHOICES] == ["olive", "red", "blue", "white"] and row[ANSWERS] == ["A"]
    assert row[METRIC] == "mc_letter" and row[CATEGORY] == "attribute_recognition"
    two = items["mmbench:1"]
    assert two[CHOICES] == ["yes", "no"] and two[QUESTION] == "Is there a square?"
    assert two[IMAGE] == row[IMAGE]  # image cell "0" points at row 0's image
    assert reasons(parsed) == {
        "mmbench:2": "field 'image' is not valid base64",
        "mmbench:3": "field 'answer' ('E') is not one of the 4 option letters",
    }
    assert "mmbench:4" in items  # decodes as base64; the image stage rejects its bytes


VIZWIZ_REASONS = {
    "vizwiz:VizWiz_val_00000003.jpg": "field 'answerable' must be 0 or 1, got 2",
    "vizwiz:VizWiz_val_00000004.jpg": "field 'answers' must be a non-empty list of {answer: ...} objects",
    "vizwiz:VizWiz_val_00000005.jpg": "missing field 'question'",
}


def test_vizwiz_answerable_from_the_file() -> None:
    """Outside unanswerable_test (here ood_test, a user's choice) every row stays in one set, as published."""
    parsed = load(spec("vizwiz", "vizwiz", "vizwiz/val.json", "vizwiz/val", split="ood_test"))
    items = by_id(parsed.items)
    assert items["vizwiz:VizWiz_val_00000000.jpg"][ANSWERABLE] is True
    unanswerable = items["vizwiz:VizWiz_val_00000001.jpg"]
    assert unanswerable[ANSWERABLE] is False and unanswerable[CATEGORY] == "unanswerable"
    assert unanswerable[METRIC] == "vqa_soft" and len(unanswerable[ANSWERS]) == 10
    assert {(r[DATASET], r[SPLIT]) for r in parsed.items} == {("vizwiz", "ood_test")}
    assert reasons(parsed) == VIZWIZ_REASONS
    assert {q[DATASET] for q in parsed.quarantine} == {"vizwiz"}
    assert dataset_names(spec("vizwiz", "vizwiz", "vizwiz/val.json", split="ood_test")) == ("vizwiz",)


def test_vizwiz_as_unanswerable_set_splits_off_its_answerable_rows() -> None:
    """The refusal rate is scored on answerable 0 rows only; answerable 1 rows become `<name>_answerable`
    (ood_test), with the same ids, and a bad row is counted in the set its `answerable` routes it to."""
    vizwiz = spec("vw", "vizwiz", "vizwiz/val.json", "vizwiz/val", split="unanswerable_test")
    parsed = load(vizwiz)
    items = by_id(parsed.items)
    assert set(items) == {
        "vw:VizWiz_val_00000000.jpg",
        "vw:VizWiz_val_00000001.jpg",
        "vw:VizWiz_val_00000002.jpg",
    }
    sets = {(r[DATASET], r[SPLIT], r[ANSWERABLE]) for r in parsed.items}
    assert sets == {("vw", "unanswerable_test", False), ("vw_answerable", "ood_test", True)}
    assert items["vw:VizWiz_val_00000000.jpg"][DATASET] == "vw_answerable"
    assert items["vw:VizWiz_val_00000001.jpg"][DATASET] == "vw"
    assert items["vw:VizWiz_val_00000000.jpg"][ANSWERS][:3] == ["yellow", "yellow", "gold"]
    assert reasons(parsed) == {key.replace("vizwiz:", "vw:"): why for key, why in VIZWIZ_REASONS.items()}
    bad_sets = {q[ROW_KEY]: q[DATASET] for q in parsed.quarantine}
    assert bad_sets == {
        "vw:VizWiz_val_00000003.jpg": "vw",  # answerable 2: cannot be routed, stays with the spec's name
        "vw:VizWiz_val_00000004.jpg": "vw",
        "vw:VizWiz_val_00000005.jpg": "vw_answerable",
    }
    per_set = Counter(r[DATASET] for r in parsed.items) + Counter(q[DATASET] for q in parsed.quarantine)
    assert per_set == {"vw": 3, "vw_answerable": 3} and parsed.n_input == 6  # nothing lost
    assert dataset_names(vizwiz) == ("vw", "vw_answerable") == tuple(sorted(per_set))
    assert pa.Table.from_pylist(parsed.items, schema=ITEMS).num_rows == 3

    limited = load(spec("vw", "vizwiz", "vizwiz/val.json", "vizwiz/val", split="unanswerable_test", limit=2))
    assert [r[DATASET] for r in limited.items] == ["vw_answerable", "vw"]  # limit counts file rows


@pytest.mark.parametrize("flag", [True, False, 1.0])
def test_vizwiz_answerable_flag_may_be_a_json_boolean(tmp_path: Path, flag) -> None:
    row = {"image": "a.jpg", "question": "q?", "answers": [{"answer": "x"}] * 10, "answerable": flag}
    (tmp_path / "val.json").write_text(json.dumps([row, {**row, "image": "b.jpg", "answerable": "1"}]))
    parsed = load(
        DatasetSpec(name="v", format="vizwiz", path=str(tmp_path / "val.json"), images=str(tmp_path),
                    split="unanswerable_test")
    )  # fmt: skip
    assert [(r[DATASET], r[ANSWERABLE]) for r in parsed.items] == [
        ("v_answerable" if flag else "v", bool(flag))
    ]
    assert reasons(parsed) == {"v:b.jpg": "field 'answerable' must be 0 or 1, got '1'"}


def test_unanswerable_jsonl() -> None:
    parsed = load(spec("beyondvisqa", "unanswerable_jsonl", "unanswerable/beyondvisqa.jsonl"))
    items = by_id(parsed.items)
    mc = items["beyondvisqa:bv1"]
    assert mc[ANSWERABLE] is False and mc[METRIC] == "mc_letter" and len(mc[CHOICES]) == 5
    assert mc[CATEGORY] == "knowledge" and mc[IMAGE_PATH] == str(FIX / "unanswerable/images/u1.png")
    idk = items["beyondvisqa:idk1"]
    assert idk[METRIC] == "exact" and idk[ANSWERS] == [] and idk[CATEGORY] == "unanswerable"
    got = reasons(parsed)
    assert got["beyondvisqa:bad1"] == "missing field 'question'"
    assert got["beyondvisqa:line4"].startswith("malformed JSON on line 4")
