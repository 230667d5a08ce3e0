"""ShapesWorld exported in the published formats reads back through the project's own loaders unchanged.

The round trip goes through the prepare stage's own entry point (`read_sources` on the 7B config with
`/data` replaced by the export folder, so the test also proves the layout matches that config) and its image
check, then compares every loaded item with the ShapesWorld item it came from: question (minus the prompt
decoration each format's loader adds), answers (VQA-normalised), choices, answerable, decoded pixels (the
COCO and VizWiz photos have those sets' 4:3 and 3:4 shapes, and resized back to the scene's size are its
pixels exactly: nothing of the scene is lost), and the data set and split it lands in (VizWiz, an
unanswerable set in that config, puts its answerable rows in `vizwiz_answerable`, ood_test, while the file
keeps both, as published).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inbol_ray import schema as S
from inbol_ray.config import DatasetSpec, ShapesConfig, load_config
from inbol_ray.data import shapes
from inbol_ray.data.export import LAYOUT, MANIFEST, export_shapes
from inbol_ray.data.export.questions import HINTS, REFUSAL_OPTION, question_family
from inbol_ray.data.images import check_images, decode_image, load_image_bytes
from inbol_ray.data.loaders import load
from inbol_ray.data.prepare import input_problems, read_sources
from inbol_ray.grading import grade, is_refusal_response, normalize_answer
from inbol_ray.refusal import is_refusal
from jobs import export_shapes as export_job

ROOT = Path(__file__).resolve().parents[2]
SMALL = ShapesConfig(n_pretrain=20, n_train=80, n_val=12, n_id_test=16, n_ood_test=12, n_unanswerable_test=12)
LETTERS = "ABCDEFGHIJ"
VQA_STYLE = {"vqav2", "vqav2_val", "vizwiz", "vizwiz_train"}  # ten annotator answers
MULTIPLE_CHOICE = {"scienceqa", "mmmu", "mmbench", "aokvqa"}  # A-OKVQA: its multiple-choice task
PROMPT_PREFIX = {"scienceqa": "Context: ", "mmbench": ""}  # the loaders prepend the hint as LLaVA-1.5 does
VIZWIZ_ANSWERABLE = ("vizwiz_answerable", "ood_test")  # (dataset, split) of VizWiz's answerable rows
COCO, VIZWIZ = ("vqav2", "vqav2_val", "aokvqa"), ("vizwiz", "vizwiz_train")
PHOTO_SHAPE = {**dict.fromkeys(COCO, (4, 3)), **dict.fromkeys(VIZWIZ, (3, 4))}
"""Width:height of the exported photos where the real set's are not square (COCO landscape, VizWiz portrait)."""


def shapes_specs(out: Path) -> list[DatasetSpec]:
    """The 7B config's data sets under `data.root` = the export folder, plus the one extra file."""
    cfg = load_config(ROOT / "configs" / "llava-1.5-7b.yaml", [f"data.root={out}"])
    specs = list(cfg.data.datasets)
    fmt, split, path, _ = LAYOUT["unanswerable_train"]
    return [*specs, DatasetSpec(name="unanswerable_train", format=fmt, split=split, path=str(out / path))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    items = shapes.generate_items(SMALL, 48)
    out = tmp_path_factory.mktemp("shapes_export")
    manifest = export_shapes(items, str(out))
    cfg = load_config(ROOT / "configs" / "llava-1.5-7b.yaml")
    cfg.data.datasets = shapes_specs(out)
    return items, out, manifest, cfg


def originals(items) -> dict[str, dict]:
    return {row[S.ID]: row for row in items.to_pylist()}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data))


def same_scene(exported: bytes, original: bytes, name: str) -> bool:
    """The exported photo has the real set's shape and holds the whole scene: resized back to the scene's
    size (nearest neighbour, the export's own resampling) it is the original's pixels, every one."""
    photo, scene = decode_image(exported), decode_image(original)
    width, height = PHOTO_SHAPE.get(name, (1, 1))
    if photo.width * height != photo.height * width or min(photo.size) != min(scene.size):
        return False
    return np.array_equal(np.asarray(photo.resize(scene.size, Image.Resampling.NEAREST)), pixels(original))


def test_every_config_path_finds_its_file(exported) -> None:
    _, out, manifest, cfg = exported
    assert input_problems(cfg.data) == []
    for spec in cfg.data.datasets:
        entry = manifest["datasets"][spec.name]
        assert (entry["format"], entry["split"], entry["path"]) == (spec.format, spec.split, spec.path)
        assert entry["images"] == (spec.images if spec.images else "")
    assert json.loads((out / MANIFEST).read_text())["files"] == manifest["files"]


def test_round_trip_through_the_prepare_entry_point(exported, tmp_path) -> None:
    items, _, manifest, cfg = exported
    sources = read_sources(cfg, str(tmp_path / "staging"))
    assert sources.quarantine == []
    checked = check_images(sources.items, storage="bytes", max_bytes=10**7, max_pixels=10**7)
    assert checked[S.REASON].null_count == checked.num_rows  # every image file decodes
    # The 7B config also has prepare build mismatched unanswerable training rows (data sets `<name>_mismatch`,
    # data.unanswerable_per_answerable): made from the loaded rows, not read from a file, so set apart here.
    loaded = [r for r in checked.to_pylist() if not r[S.DATASET].endswith("_mismatch")]
    built = [r for r in checked.to_pylist() if r[S.DATASET].endswith("_mismatch")]
    assert all(not r[S.ANSWERABLE] and r[S.SPLIT] == "train" for r in built)
    by_id = originals(items)
    seen: list[str] = []
    refusal_letters: set[str] = set()
    for item in loaded:
        name, key = item[S.ID].split(":", 1)
        orig = by_id[manifest["datasets"][name]["ids"][key]]
        seen.append(orig[S.ID])
        where = f"{item[S.ID]} <- {orig[S.ID]}"
        question = item[S.QUESTION]
        if name in PROMPT_PREFIX:
            assert (
                question
                == f"{PROMPT_PREFIX[name]}{HINTS[question_family(orig[S.QUESTION])]}\n{orig[S.QUESTION]}"
            )
        elif name == "mmmu":
            assert question == f"<image 1> {orig[S.QUESTION]}", where
        else:
            assert question == orig[S.QUESTION], where
        assert item[S.ANSWERABLE] == orig[S.ANSWERABLE], where
        assert same_scene(item[S.IMAGE], orig[S.IMAGE], name), where
        answers, choices = item[S.ANSWERS], item[S.CHOICES]
        if name in MULTIPLE_CHOICE:
            (letter,) = answers
            assert choices[LETTERS.index(letter)] == orig[S.ANSWERS][0], where
            assert len(set(choices)) == len(choices) >= 2 and choices.count(orig[S.ANSWERS][0]) == 1, where
        elif not orig[S.ANSWERABLE]:
            if name in ("vizwiz", "vizwiz_train"):
                assert answers == ["unanswerable"] * 10 and choices is None, where
            elif name == "beyondvisqa":  # one refusal option, at any letter; picking it is refusing
                (at,) = [i for i, c in enumerate(choices) if is_refusal(c)]
                assert answers == [] and choices[at] == REFUSAL_OPTION and len(set(choices)) == len(choices)
                assert is_refusal_response(LETTERS[at], choices, refusal_option=True, question=question), (
                    where
                )
                others = [LETTERS[i] for i in range(len(choices)) if i != at]
                assert not any(
                    is_refusal_response(letter, choices, refusal_option=True, question=question)
                    for letter in others
                )
                refusal_letters.add(LETTERS[at])
            else:
                assert answers == [] and choices is None, where
        else:
            assert choices is None, where
            assert {normalize_answer(a) for a in answers} == {normalize_answer(orig[S.ANSWERS][0])}, where
            assert len(answers) == (10 if name in VQA_STYLE else 1), where
        if orig[S.ANSWERABLE]:  # the gold answer scores under the loaded item's own metric
            assert grade(orig[S.ANSWERS][0], answers, item[S.METRIC], choices), where
        if name == "vizwiz":  # an unanswerable set: its answerable rows are a set of their own (ood_test)
            expected = ("vizwiz", "unanswerable_test") if not orig[S.ANSWERABLE] else VIZWIZ_ANSWERABLE
            assert (item[S.DATASET], item[S.SPLIT]) == expected, where
        else:
            assert (item[S.DATASET], item[S.SPLIT]) == (name, LAYOUT[name][1]), where
    exported_ids = [i for i, r in by_id.items() if r[S.DATASET] != "shapes_pretrain"]
    assert sorted(seen) == sorted(exported_ids)  # each exported item exactly once, nothing else
    counts = Counter(r[S.ID].split(":")[0] for r in loaded)
    assert counts == {name: entry["rows"] for name, entry in manifest["datasets"].items() if entry["rows"]}
    per_set = Counter(r[S.DATASET] for r in loaded)  # vizwiz's rows: split over two sets, none lost
    assert per_set["vizwiz"] + per_set["vizwiz_answerable"] == manifest["datasets"]["vizwiz"]["rows"]
    assert per_set["vizwiz"] > 0 and per_set["vizwiz_answerable"] > 0
    assert len(refusal_letters) > 1  # the refusal option is not always at the same letter


def test_every_data_set_and_split_is_filled(exported) -> None:
    items, _, manifest, _ = exported
    rows = {name: entry["rows"] for name, entry in manifest["datasets"].items()}
    assert all(n > 0 for n in rows.values()), rows
    by_id = originals(items)
    vizwiz = [by_id[i] for i in manifest["datasets"]["vizwiz"]["ids"].values()]
    assert {r[S.ANSWERABLE] for r in vizwiz} == {True, False}  # VizWiz mixes both, as the real set does
    # its answerable rows load as an out-of-domain set, so they are out-of-domain items
    assert {r[S.DATASET] for r in vizwiz if r[S.ANSWERABLE]} == {"shapes_ood_scene"}
    assert manifest["datasets"]["vizwiz"]["from"] == ["shapes_ood_scene", "shapes_unanswerable"]
    assert manifest["datasets"]["vqav2_val"]["from"] == ["shapes_id_test"]
    # the validation set: VizWiz's train file, both kinds of row in one set under split val
    assert manifest["datasets"]["vizwiz_train"]["from"] == ["shapes_val"]
    val = [by_id[i] for i in manifest["datasets"]["vizwiz_train"]["ids"].values()]
    assert {r[S.ANSWERABLE] for r in val} == {True, False}
    assert manifest["datasets"]["gqa"]["from"] == ["shapes_ood_scene"]
    assert manifest["datasets"]["aokvqa"]["from"] == ["shapes_ood_paraphrase"]


def test_aokvqa_file_also_holds_the_multiple_choice_task(exported) -> None:
    items, out, manifest, cfg = exported
    spec = next(s for s in cfg.data.datasets if s.name == "aokvqa")
    parsed = load(dataclasses.replace(spec, format="aokvqa_mc"))
    assert parsed.quarantine == [] and len(parsed.items) == manifest["datasets"]["aokvqa"]["rows"]
    by_id = originals(items)
    for item in parsed.items:
        orig = by_id[manifest["datasets"]["aokvqa"]["ids"][item[S.ID].split(":", 1)[1]]]
        assert item[S.CHOICES][LETTERS.index(item[S.ANSWERS][0])] == orig[S.ANSWERS][0]
        assert same_scene(load_image_bytes(item), orig[S.IMAGE], "aokvqa")


def test_export_is_deterministic(exported, tmp_path: Path) -> None:
    items, out, _, _ = exported
    export_shapes(items, str(tmp_path))
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert files == sorted(
        p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() and p.name != MANIFEST
    )
    assert all((out / f).read_bytes() == (tmp_path / f).read_bytes() for f in files)


def test_cli_exports_the_configured_shapes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sizes = [
        f"data.shapes.{k}=4"
        for k in ("n_pretrain", "n_train", "n_val", "n_id_test", "n_ood_test", "n_unanswerable_test")
    ]
    code = export_job.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(tmp_path), *sizes])
    assert code == 0
    printed = capsys.readouterr().out
    assert "vqav2/v2_OpenEnded_mscoco_val2014_questions.json" in printed
    assert (tmp_path / "vizwiz" / "val.json").exists() and (tmp_path / MANIFEST).exists()
