"""Writers of the Hugging Face `datasets` releases' Parquet files: the evaluation sets (and ScienceQA-IMG's
training split) as lmms-lab and HuggingFaceM4 publish them, images embedded.

Why: format `hf` (`inbol_ray.data.loaders.hf`) must give the same items as a set's published format. The
same ShapesWorld rows the published-format writers get are written here in each release's schema (its
data set card's columns, `hf_presets` cites them), with the same native keys (question ids, MMMU ids,
MMBench indices), the same options in the same order (seeded by item id and the same salt) and the same
image bytes (COCO's 4:3 photos for VQAv2 and A-OKVQA): loaded both ways, a set's questions, answers,
choices and pixels must be equal (tests/integration/test_hf_formats.py).

Layout: `hf/<org>/<name>/` per release, files named as on the Hub (`data/<split>-00000-of-00001.parquet`
for a default config, `<config>/<split>-00000-of-00001.parquet` otherwise), so the folder is what
`hf download` leaves, and also what a hub cache snapshot holds. 100 rows per row group, as `datasets`
writes image data sets (`config.PARQUET_ROW_GROUP_SIZE_FOR_IMAGE_DATASETS`), so readers meet several.
Not written: lmms-lab/VizWiz-VQA (refused by its preset: it drops VizWiz's `answerable` flag) and the sets
no release carries (OVEN, BeyondVisQA); the columns a release has but no loader reads and whose exact
nested types the cards do not show (GQA's `annotations`, `semantic`) are left out.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from inbol_ray.data import io as dio
from inbol_ray.data.export.evaluation_formats import LETTERS, MMMU_SCHEMA, mmmu_subject
from inbol_ray.data.export.questions import (
    ANSWER_TYPE,
    FAMILY_CATEGORY,
    GQA_SEMANTIC,
    GQA_STRUCTURAL,
    HINTS,
    Row,
    multiple_choice,
    question_type,
    token,
)
from inbol_ray.data.export.training_formats import COCO_ASPECT, Written, as_photo, ten_answers

HF_ROOT = "hf"
ROW_GROUP_ROWS = 100
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@dataclass(frozen=True)
class Release:
    """Where a config data set lands as a release: the preset that reads it, its folder under the export
    root, and the config and split it is written as."""

    preset: str
    config: str
    split: str

    @property
    def folder(self) -> str:
        return f"{HF_ROOT}/{self.preset.split(':', 1)[0]}"

    def file(self, config: str = "") -> str:
        """`<folder>/<config or data>/<split>-00000-of-00001.parquet` (relative to the export root)."""
        return f"{self.folder}/{config or self.config or 'data'}/{self.split}-00000-of-00001.parquet"


RELEASES: dict[str, Release] = {
    "vqav2_val": Release("lmms-lab/VQAv2", "", "validation"),
    "gqa": Release("lmms-lab/GQA", "testdev_balanced_instructions", "testdev"),
    "mmmu": Release("lmms-lab/MMMU", "", "validation"),
    "mmbench": Release("lmms-lab/MMBench", "en", "dev"),
    "aokvqa": Release("HuggingFaceM4/A-OKVQA", "", "validation"),
    "scienceqa": Release("lmms-lab/ScienceQA-IMG", "", "train"),
}
"""Config data set name (as `export.LAYOUT` names it) -> its release. The 7B config's evaluation sets that
have a release here, and ScienceQA (a training set whose release keeps choices and the answer index)."""


def _image(data: bytes, path: str | None) -> dict[str, Any]:
    return {"bytes": data, "path": path}


def write_parquet(table: pa.Table, location: str) -> None:
    """`dio.write_table` with the image data sets' row groups (temp name, then move: no half files)."""
    fs, path = dio.resolve(location)
    fs.create_dir(dio.parent(path), recursive=True)
    tmp = f"{dio.parent(path)}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    pq.write_table(table, tmp, filesystem=fs, row_group_size=ROW_GROUP_ROWS)
    fs.move(tmp, path)


# --- lmms-lab/VQAv2 -------------------------------------------------------------------------------------

VQAV2_SCHEMA = pa.schema(
    [
        ("question_type", pa.string()),
        ("multiple_choice_answer", pa.string()),
        (
            "answers",
            pa.list_(
                pa.struct(
                    [("answer", pa.string()), ("answer_confidence", pa.string()), ("answer_id", pa.int64())]
                )
            ),
        ),
        ("image_id", pa.int64()),
        ("answer_type", pa.string()),
        ("question_id", pa.int64()),
        ("question", pa.string()),
        ("image", IMAGE),
    ]
)


def vqav2_tables(
    rows: Sequence[Row], release: Release, names: Sequence[str], out: Written
) -> dict[str, pa.Table]:
    """VQAv2 validation as lmms-lab has it: the val2014 questions joined with their ten answers and photo;
    ids as `training_formats.write_vqav2` numbers them (image i+1, question image*1000)."""
    records = []
    for i, row in enumerate(rows):
        image_id = i + 1
        qid = image_id * 1000
        records.append(
            {
                "question_type": question_type(row.question),
                "multiple_choice_answer": row.answer,
                "answers": [{**a, "answer_id": k + 1} for k, a in enumerate(ten_answers(str(row.answer)))],
                "image_id": image_id,
                "answer_type": ANSWER_TYPE[row.family],
                "question_id": qid,
                "question": row.question,
                "image": _image(as_photo(row.image, COCO_ASPECT), f"COCO_val2014_{image_id:012d}.jpg"),
            }
        )
        out.key(qid, row)
    return {release.file(): pa.Table.from_pylist(records, schema=VQAV2_SCHEMA)}


# --- lmms-lab/GQA ---------------------------------------------------------------------------------------

GQA_QUESTIONS = pa.schema(
    [
        ("id", pa.string()),
        ("imageId", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("fullAnswer", pa.string()),
        ("isBalanced", pa.bool_()),
        ("groups", pa.struct([("global", pa.string()), ("local", pa.string())])),
        ("entailed", pa.list_(pa.string())),
        ("equivalent", pa.list_(pa.string())),
        (
            "types",
            pa.struct([("structural", pa.string()), ("semantic", pa.string()), ("detailed", pa.string())]),
        ),
        ("semanticStr", pa.string()),
    ]
)
GQA_IMAGES = pa.schema([("id", pa.string()), ("image", IMAGE)])


def gqa_tables(
    rows: Sequence[Row], release: Release, names: Sequence[str], out: Written
) -> dict[str, pa.Table]:
    """Two configs, as lmms-lab splits GQA: the questions (`testdev_balanced_instructions`) and the images
    they name by `imageId` (`testdev_balanced_images`, `id` + image); ids as `write_gqa` makes them. The
    images are written in reverse order, so a reader must join by key, not by position."""
    questions, images = [], []
    for i, row in enumerate(rows):
        qid, image_id = str(20_000_000 + i), f"n{i:06d}"
        questions.append(
            {
                "id": qid,
                "imageId": image_id,
                "question": row.question,
                "answer": row.answer,
                "fullAnswer": f"The answer is {row.answer}.",
                "isBalanced": True,
                "groups": {"global": None, "local": row.family},
                "entailed": [],
                "equivalent": [qid],
                "types": {
                    "structural": GQA_STRUCTURAL[row.family],
                    "semantic": GQA_SEMANTIC[row.family],
                    "detailed": row.family,
                },
                "semanticStr": "",
            }
        )
        images.append({"id": image_id, "image": _image(row.image, f"{image_id}.jpg")})
        out.key(qid, row)
    images_config = release.config.replace("_instructions", "_images")
    return {
        release.file(): pa.Table.from_pylist(questions, schema=GQA_QUESTIONS),
        release.file(images_config): pa.Table.from_pylist(images[::-1], schema=GQA_IMAGES),
    }


# --- lmms-lab/MMMU --------------------------------------------------------------------------------------


def mmmu_tables(
    rows: Sequence[Row], release: Release, names: Sequence[str], out: Written
) -> dict[str, pa.Table]:
    """MMMU's columns (`evaluation_formats.MMMU_SCHEMA`), the subjects concatenated in one split as lmms-lab
    merges them; ids and options as `write_mmmu` makes them."""
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        subject = mmmu_subject(row)
        choices, gold = multiple_choice(row, names, salt="mmmu")
        row_id = f"validation_{subject}_{len(by_subject.get(subject, [])) + 1}"
        record: dict[str, Any] = {
            "id": row_id,
            "question": f"<image 1> {row.question}",
            "options": repr(choices),
            "explanation": "",
            "img_type": "['Diagrams']",
            "answer": LETTERS[gold],
            "topic_difficulty": "Easy" if row.family in ("colour_of", "shape_of", "exists") else "Medium",
            "question_type": "multiple-choice",
            "subfield": row.family,
        }
        for k in range(1, 8):
            record[f"image_{k}"] = _image(row.image, f"{row_id}_1.png") if k == 1 else None
        by_subject.setdefault(subject, []).append(record)
        out.key(row_id, row)
    records = [record for subject in sorted(by_subject) for record in by_subject[subject]]
    return {release.file(): pa.Table.from_pylist(records, schema=MMMU_SCHEMA)}


# --- lmms-lab/MMBench (config en) -----------------------------------------------------------------------

MMBENCH_SCHEMA = pa.schema(
    [
        ("index", pa.string()),  # a string in the `en` config (an integer in `cn`)
        ("question", pa.string()),
        ("hint", pa.string()),
        ("answer", pa.string()),
        *[(letter, pa.string()) for letter in "ABCD"],
        ("category", pa.string()),
        ("image", IMAGE),
        ("source", pa.string()),
        ("L2-category", pa.string()),
        ("comment", pa.string()),
        ("split", pa.string()),
    ]
)


def mmbench_tables(
    rows: Sequence[Row], release: Release, names: Sequence[str], out: Written
) -> dict[str, pa.Table]:
    """MMBench dev (English), options A-D with absent ones null, indices and options as `write_mmbench`."""
    records = []
    for i, row in enumerate(rows):
        choices, gold = multiple_choice(row, names, salt="mmbench", max_options=len(LETTERS))
        records.append(
            {
                "index": str(i),
                "question": row.question,
                "hint": HINTS[row.family],
                "answer": LETTERS[gold],
                **{letter: (choices[k] if k < len(choices) else None) for k, letter in enumerate(LETTERS)},
                "category": FAMILY_CATEGORY[row.family],
                "image": _image(row.image, None),
                "source": "shapesworld",
                "L2-category": "perception" if row.family != "name_of" else "knowledge",
                "comment": "",
                "split": "dev",
            }
        )
        out.key(i, row)
    return {release.file(): pa.Table.from_pylist(records, schema=MMBENCH_SCHEMA)}


# --- HuggingFaceM4/A-OKVQA ------------------------------------------------------------------------------

AOKVQA_SCHEMA = pa.schema(
    [
        ("image", IMAGE),
        ("question_id", pa.string()),
        ("question", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("correct_choice_idx", pa.int8()),
        ("direct_answers", pa.list_(pa.string())),
        ("difficult_direct_answer", pa.bool_()),
        ("rationales", pa.list_(pa.string())),
    ]
)


def aokvqa_tables(
    rows: Sequence[Row], release: Release, names: Sequence[str], out: Written
) -> dict[str, pa.Table]:
    """A-OKVQA validation with its COCO photo embedded; question ids and options as `write_aokvqa`."""
    records = []
    for i, row in enumerate(rows):
        qid = token(row.id)
        choices, gold = multiple_choice(row, names, salt="aokvqa")
        photo = as_photo(row.image, COCO_ASPECT)
        records.append(
            {
                "image": _image(photo, f"{i + 1:012d}.jpg"),
                "question_id": qid,
                "question": row.question,
                "choices": choices,
                "correct_choice_idx": gold,
                "direct_answers": [str(row.answer)] * 10,
                "difficult_direct_answer": False,
                "rationales": [HINTS[row.family]],
            }
        )
        out.key(qid, row)
    return {release.file(): pa.Table.from_pylist(records, schema=AOKVQA_SCHEMA)}


# --- lmms-lab/ScienceQA-IMG -----------------------------------------------------------------------------

SCIENCEQA_SCHEMA = pa.schema(
    [
        ("image", IMAGE),
        ("question", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("answer", pa.int8()),
        *[
            (name, pa.string())
            for name in (
                "hint",
                "task",
                "grade",
                "subject",
                "topic",
                "category",
                "skill",
                "lecture",
                "solution",
            )
        ],
    ]
)


def scienceqa_tables(
    rows: Sequence[Row], release: Release, names: Sequence[str], out: Written
) -> dict[str, pa.Table]:
    """ScienceQA-IMG's training split; options as `write_scienceqa` draws them. The release has no problem
    id, so a row's key is `<split>-<position>` (the loader's key for it)."""
    records = []
    for i, row in enumerate(rows):
        choices, answer = multiple_choice(row, names, salt="scienceqa")
        records.append(
            {
                "image": _image(row.image, None),
                "question": row.question,
                "choices": choices,
                "answer": answer,
                "hint": HINTS[row.family],
                "task": "closed choice",
                "grade": "grade1",
                "subject": "natural science",
                "topic": "shapesworld",
                "category": FAMILY_CATEGORY[row.family],
                "skill": row.family,
                "lecture": "",
                "solution": f"The answer is {row.answer}.",
            }
        )
        out.key(f"{release.split}-{i}", row)
    return {release.file(): pa.Table.from_pylist(records, schema=SCIENCEQA_SCHEMA)}


TABLES: dict[str, Callable[[Sequence[Row], Release, Sequence[str], Written], dict[str, pa.Table]]] = {
    "vqav2_val": vqav2_tables,
    "gqa": gqa_tables,
    "mmmu": mmmu_tables,
    "mmbench": mmbench_tables,
    "aokvqa": aokvqa_tables,
    "scienceqa": scienceqa_tables,
}


def write_releases(
    assigned: dict[str, list[Row]], root: str, names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Every set of `RELEASES` written under `<root>/hf/`; returns per set its manifest entry: `preset`,
    `path` (the release folder), `hf_config`, `hf_split`, `rows`, `ids` {native key -> ShapesWorld id},
    `files` {relative path: rows}."""
    entries: dict[str, dict[str, Any]] = {}
    for name, release in RELEASES.items():
        rows = assigned.get(name, [])
        written = Written()
        tables = TABLES[name](rows, release, names, written)
        for rel, table in tables.items():
            write_parquet(table, dio.join(root, rel))
            written.files[rel] = table.num_rows
        entries[name] = {
            "preset": release.preset,
            "path": dio.join(root, release.folder),
            "hf_config": release.config,
            "hf_split": release.split,
            "rows": len(rows),
            "ids": written.ids,
            "files": written.files,
        }
    return entries
