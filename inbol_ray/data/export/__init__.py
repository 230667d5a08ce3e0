"""ShapesWorld written as the real data sets' published files, laid out like the 7B config's `/data` tree.

Why: the real-scale path (`configs/llava-1.5-7b.yaml`, `data.source: files`) reads ten data sets through
ten loaders, and nothing here can download them. Exporting ShapesWorld in their formats runs that exact
path (loaders, image checks, per-data-set reports) end to end on the tiny model, with answers known to be
right. Replace `/data` by `out_dir` in the 7B config's `data.datasets` paths and every file is found.

Which ShapesWorld set goes where, and why each mirrors the real set (every exported item goes to exactly
one file; `shapes_pretrain` is the tiny base model's own training data, which the real sets have no
counterpart of, so it is not exported):

| ShapesWorld | config name (format, split) | why |
|---|---|---|
| `shapes_train`, perception, first 3/4 | `vqav2` (train2014, train) | VQAv2 is the bulk of InBoL training: open perception questions with 10 answers |
| `shapes_train`, perception, last 1/4 | `scienceqa` (train) | ScienceQA is the closed-choice part: same questions as MC with options, answer index and a context `hint` |
| `shapes_train`, knowledge, first 3/4 | `oven` (train) | OVEN asks for named entities: ShapesWorld's invented names are its entities |
| `shapes_train`, knowledge, last 1/4 | `oven_query` (train) | OVEN's query split: the same kind of entity question from its second training file |
| `shapes_train`, unanswerable | `unanswerable_train` (`unanswerable_jsonl`, train) | not in the 7B config (its training sets are all answerable); add a line to give training the extrinsic boundary |
| `shapes_val` | `vizwiz_train` (VizWiz `train.json`, val) | the validation set settings are chosen on: answerable and unanswerable rows in one file, as VizWiz's train annotations hold them (under split `val` they stay one set) |
| `shapes_id_test` | `vqav2_val` (val2014, id_test) | same distribution as the training questions, like VQAv2 val for VQAv2 train |
| `shapes_ood_paraphrase`, first half | `aokvqa` (`aokvqa_mc`, ood_test) | A-OKVQA asks new questions about the training set's image source (COCO): a question-side shift; scored by its multiple-choice task, as LLaVA-1.5 is (the file holds both tasks) |
| `shapes_ood_paraphrase`, second half | `mmbench` (ood_test) | MMBench rewords perception questions as options + hint: also a question-side shift |
| `shapes_ood_scene` but the VizWiz share, first half | `gqa` (ood_test) | GQA is scene-graph questions on another image source (Visual Genome): an image-side shift |
| `shapes_ood_scene` but the VizWiz share, second half | `mmmu` (ood_test) | MMMU's images are another domain altogether: image-side shift, as multiple choice |
| `shapes_unanswerable`, first half | `beyondvisqa` (`unanswerable_jsonl`, unanswerable_test) | unanswerable questions with four plausible options and the refusal option at a seeded letter, as BeyondVisQA offers |
| `shapes_unanswerable`, second half + the last `shapes_ood_scene` items | `vizwiz` (unanswerable_test) | VizWiz's file mixes answerable (`answerable` 1) and unanswerable (0, answers "unanswerable") rows, and so does this one. Loaded as an unanswerable set, its answerable rows become `vizwiz_answerable` (ood_test), so they are out-of-domain items, from the image-side shift (as blind users' photos are): as many as the unanswerable ones, at most a quarter of `shapes_ood_scene` |

Splits are iid per data set, so taking slices (first half, last quarter) keeps each part's mix of
question families. Multiple-choice versions (ScienceQA, A-OKVQA's MC task, MMMU, MMBench, BeyondVisQA)
draw distractors from the family's answer vocabulary, seeded by item id (`questions.py`).

Images: PNG in every format, also under the `.jpg` names VQAv2, OVEN, A-OKVQA, GQA and VizWiz mandate. The
project opens images by content with PIL (`inbol_ray.data.images`), never by extension, and JPEG
re-encoding would have made the round trip lossy for no gain inside the project. Where the real set's
photos are not square, neither are the exported ones: the COCO images (VQAv2, A-OKVQA) are 4:3 landscape
and VizWiz's 3:4 portrait, the square scene stretched to that shape (`training_formats.as_photo`: the
whole scene stays in view, so the model's `image_aspect`, LLaVA-1.5's pad or the processor's centre crop,
is exercised as on real photos); resized back to the scene's size they are its pixels exactly. The other
formats keep the item's bytes unchanged.
VQAv2's training images also get COCO instance annotations (`coco/annotations/instances_train2014.json`,
the 7B config's absence evidence for mismatched questions): the images listed, no boxes, which is true of
ShapesWorld's pictures (no COCO object in them), so the config's instances path runs end to end.

Answers: ShapesWorld has one gold answer per item; the VQA-style formats get ten agreeing annotators, so
VQA accuracy equals exact match. Counts stay number words ("two"): VQA normalisation maps them to digits.

Hugging Face releases: the evaluation sets that have a `datasets` release the project reads (`vqav2_val`,
`aokvqa`, `gqa`, `mmmu`, `mmbench`) and ScienceQA's training set are also written in their release's
Parquet schema, images embedded, under `hf/<org>/<name>/` (`hf_formats`; configs/rehearsal-hf.yaml reads
them with format `hf`). The same rows, keys, options and image bytes as the published files: loaded
either way a set's items are equal. The manifest's `hf` entry says where each went.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from inbol_ray.data import io as dio
from inbol_ray.data.export.evaluation_formats import (
    AOKVQA_FILE,
    AOKVQA_IMAGES,
    GQA_FILE,
    GQA_IMAGES,
    MMBENCH_FILE,
    MMMU_DIR,
    VIZWIZ_FILE,
    VIZWIZ_IMAGES,
    vizwiz_paths,
    write_aokvqa,
    write_gqa,
    write_mmbench,
    write_mmmu,
    write_unanswerable_jsonl,
    write_vizwiz,
)
from inbol_ray.data.export.hf_formats import RELEASES, write_releases
from inbol_ray.data.export.questions import Row, name_pool, rows_of
from inbol_ray.data.export.training_formats import (
    OVEN_ENTITY,
    OVEN_IMAGES,
    OVEN_QUERY,
    SCIENCEQA_IMAGES,
    SCIENCEQA_PROBLEMS,
    Written,
    vqav2_paths,
    write_oven,
    write_scienceqa,
    write_vqav2,
)

MANIFEST = "shapesworld_export.json"
BEYONDVISQA_FILE = "beyondvisqa/beyondvisqa.jsonl"
UNANSWERABLE_TRAIN_FILE = "unanswerable_train/unanswerable_train.jsonl"
NOT_EXPORTED = ("shapes_pretrain",)
EXPORTED = (
    "shapes_train",
    "shapes_val",
    "shapes_id_test",
    "shapes_ood_paraphrase",
    "shapes_ood_scene",
    "shapes_unanswerable",
)

# config name -> (format, split, path, images), paths relative to the export root as in the 7B config.
LAYOUT: dict[str, tuple[str, str, str, str]] = {
    "vqav2": ("vqav2", "train", vqav2_paths("train2014")[0], vqav2_paths("train2014")[2]),
    "scienceqa": ("scienceqa", "train", SCIENCEQA_PROBLEMS, SCIENCEQA_IMAGES),
    "oven": ("oven", "train", OVEN_ENTITY, OVEN_IMAGES),
    "oven_query": ("oven", "train", OVEN_QUERY, OVEN_IMAGES),
    "unanswerable_train": ("unanswerable_jsonl", "train", UNANSWERABLE_TRAIN_FILE, ""),
    "vizwiz_train": ("vizwiz", "val", *vizwiz_paths("train")),
    "vqav2_val": ("vqav2", "id_test", vqav2_paths("val2014")[0], vqav2_paths("val2014")[2]),
    "aokvqa": ("aokvqa_mc", "ood_test", AOKVQA_FILE, AOKVQA_IMAGES),
    "gqa": ("gqa", "ood_test", GQA_FILE, GQA_IMAGES),
    "mmmu": ("mmmu", "ood_test", MMMU_DIR, ""),
    "mmbench": ("mmbench", "ood_test", MMBENCH_FILE, ""),
    "beyondvisqa": ("unanswerable_jsonl", "unanswerable_test", BEYONDVISQA_FILE, ""),
    "vizwiz": ("vizwiz", "unanswerable_test", VIZWIZ_FILE, VIZWIZ_IMAGES),
}

# One writer per exported data set: (rows, export root, invented names for distractors) -> Written.
WRITERS: dict[str, Callable[[Sequence[Row], str, Sequence[str]], Written]] = {
    "vqav2": lambda rows, root, names: write_vqav2(rows, root, "train2014"),
    "scienceqa": write_scienceqa,
    "oven": lambda rows, root, names: write_oven(rows, root),
    "oven_query": lambda rows, root, names: write_oven(rows, root, "query"),
    "unanswerable_train": lambda rows, root, names: write_unanswerable_jsonl(
        rows, root, UNANSWERABLE_TRAIN_FILE, names, with_choices=False
    ),
    "vizwiz_train": lambda rows, root, names: write_vizwiz(rows, root, "train"),
    "vqav2_val": lambda rows, root, names: write_vqav2(rows, root, "val2014"),
    "aokvqa": write_aokvqa,
    "gqa": lambda rows, root, names: write_gqa(rows, root),
    "mmmu": write_mmmu,
    "mmbench": write_mmbench,
    "beyondvisqa": lambda rows, root, names: write_unanswerable_jsonl(
        rows, root, BEYONDVISQA_FILE, names, with_choices=True
    ),
    "vizwiz": lambda rows, root, names: write_vizwiz(rows, root),
}
ANSWERABLE_ONLY = (
    "vqav2",
    "scienceqa",
    "oven",
    "oven_query",
    "vqav2_val",
    "aokvqa",
    "gqa",
    "mmmu",
    "mmbench",
)


def _halves(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    cut = (len(rows) + 1) // 2
    return rows[:cut], rows[cut:]


def assign(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Partition the exported ShapesWorld items over the config's data sets (the table in the docstring)."""
    by_set: dict[str, list[Row]] = {}
    for row in rows:
        if row.dataset not in NOT_EXPORTED:
            by_set.setdefault(row.dataset, []).append(row)
    unknown = sorted(set(by_set) - set(EXPORTED))
    if unknown:
        raise ValueError(f"no published format is assigned to ShapesWorld set(s) {unknown}")
    train = by_set.get("shapes_train", [])
    perception = [r for r in train if r.answer is not None and r.family != "name_of"]
    n_mc = len(perception) // 4
    knowledge = [r for r in train if r.answer is not None and r.family == "name_of"]
    n_query = len(knowledge) // 4
    beyond, vizwiz_unanswerable = _halves(by_set.get("shapes_unanswerable", []))
    aokvqa, mmbench = _halves(by_set.get("shapes_ood_paraphrase", []))
    scene = by_set.get("shapes_ood_scene", [])
    n_vizwiz = min(len(vizwiz_unanswerable), len(scene) // 4)
    gqa, mmmu = _halves(scene[: len(scene) - n_vizwiz])
    out = {
        "vqav2": perception[: len(perception) - n_mc],
        "scienceqa": perception[len(perception) - n_mc :],
        "oven": knowledge[: len(knowledge) - n_query],
        "oven_query": knowledge[len(knowledge) - n_query :],
        "unanswerable_train": [r for r in train if r.answer is None],
        "vizwiz_train": by_set.get("shapes_val", []),
        "vqav2_val": by_set.get("shapes_id_test", []),
        "aokvqa": aokvqa,
        "gqa": gqa,
        "mmmu": mmmu,
        "mmbench": mmbench,
        "beyondvisqa": beyond,
        "vizwiz": vizwiz_unanswerable + scene[len(scene) - n_vizwiz :],
    }
    for name in ANSWERABLE_ONLY:
        bad = [r.id for r in out[name] if r.answer is None]
        if bad:
            raise ValueError(f"{name} holds answerable questions only, but {bad[:3]} have no answer")
    return out


def export_shapes(items: pa.Table, out_dir: str) -> dict[str, Any]:
    """Write ShapesWorld `items` as the real data sets' files under `out_dir` (local path or URI).

    Returns (and writes to `<out_dir>/shapesworld_export.json`) a manifest: `files` {relative path: rows;
    image folders end in `/` and count images}, and per config data set name its `format`, `split`, `path`,
    `images`, `rows` and `ids` {native key -> ShapesWorld id}; a loader's item id is `<name>:<native key>`.
    `hf` holds the same for the sets also written as Hugging Face releases (`hf_formats.write_releases`:
    `preset`, `path`, `hf_config`, `hf_split`, `rows`, `ids`, `files`).
    """
    root = dio.absolute(out_dir)
    pylist = items.to_pylist()
    rows = rows_of([it for it in pylist if it["dataset"] not in NOT_EXPORTED])
    names = name_pool(pylist)
    manifest: dict[str, Any] = {"out_dir": root, "files": {}, "datasets": {}, "hf": {}}
    by_set = assign(rows)
    for name, assigned in by_set.items():
        written = WRITERS[name](assigned, root, names)
        fmt, split, path, images = LAYOUT[name]
        manifest["files"].update(written.files)
        manifest["datasets"][name] = {
            "format": fmt,
            "split": split,
            "path": dio.join(root, path),
            "images": dio.join(root, images) if images else "",
            "from": sorted({r.dataset for r in assigned}),
            "rows": len(assigned),
            "ids": written.ids,
        }
    manifest["hf"] = write_releases(by_set, root, names)
    for entry in manifest["hf"].values():
        manifest["files"].update(entry["files"])
    dio.write_bytes(dio.join(root, MANIFEST), (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


__all__ = ["LAYOUT", "MANIFEST", "RELEASES", "assign", "export_shapes"]
