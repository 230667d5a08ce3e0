"""Writers of the evaluation sets' published files: A-OKVQA, GQA, MMMU, MMBench, VizWiz, unanswerable JSONL.

Same contract as `training_formats`: the publisher's layout (as `inbol_ray.data.loaders` reads it), and a
`Written` record of rows per file and native key -> ShapesWorld id.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from inbol_ray.data import io as dio
from inbol_ray.data.export.questions import (
    ANSWER_TYPE,
    FAMILY_CATEGORY,
    GQA_SEMANTIC,
    GQA_STRUCTURAL,
    HINTS,
    Row,
    multiple_choice,
    refusal_choices,
    token,
)
from inbol_ray.data.export.training_formats import (
    COCO_ASPECT,
    VIZWIZ_ASPECT,
    Written,
    as_photo,
    dump_json,
    dump_jsonl,
    put_image,
    ten_answers,
)

LETTERS = "ABCD"

# --- A-OKVQA --------------------------------------------------------------------------------------------

AOKVQA_FILE = "aokvqa/aokvqa_v1p0_val.json"
AOKVQA_IMAGES = "coco/val2017"


def write_aokvqa(rows: Sequence[Row], root: str, names: Sequence[str]) -> Written:
    """Both A-OKVQA tasks in one file, as released: four choices + correct_choice_idx, ten direct answers;
    COCO's 4:3 photos (`COCO_ASPECT`)."""
    out = Written()
    questions = []
    for i, row in enumerate(rows):
        image_id = i + 1
        qid = token(row.id)
        choices, gold = multiple_choice(row, names, salt="aokvqa")
        questions.append(
            {
                "split": "val",
                "image_id": image_id,
                "question_id": qid,
                "question": row.question,
                "choices": choices,
                "correct_choice_idx": gold,
                "direct_answers": [str(row.answer)] * 10,
                "difficult_direct_answer": False,
                "rationales": [HINTS[row.family]],
            }
        )
        put_image(root, AOKVQA_IMAGES, f"{image_id:012d}.jpg", as_photo(row.image, COCO_ASPECT), out)
        out.key(qid, row)
    dump_json(root, AOKVQA_FILE, questions)
    out.files[AOKVQA_FILE] = len(questions)
    return out


# --- GQA ------------------------------------------------------------------------------------------------

GQA_FILE = "gqa/testdev_balanced_questions.json"
GQA_IMAGES = "gqa/images"


def write_gqa(rows: Sequence[Row], root: str) -> Written:
    """GQA's {question id: question} object with short answers and its structural/semantic types."""
    out = Written()
    questions: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        qid = str(20_000_000 + i)
        image_id = f"n{i:06d}"
        questions[qid] = {
            "semantic": [],
            "entailed": [],
            "equivalent": [qid],
            "question": row.question,
            "imageId": image_id,
            "isBalanced": True,
            "groups": {"global": None, "local": row.family},
            "answer": row.answer,
            "fullAnswer": f"The answer is {row.answer}.",
            "types": {
                "structural": GQA_STRUCTURAL[row.family],
                "semantic": GQA_SEMANTIC[row.family],
                "detailed": row.family,
            },
            "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
            "semanticStr": "",
        }
        put_image(root, GQA_IMAGES, f"{image_id}.jpg", row.image, out)
        out.key(qid, row)
    dump_json(root, GQA_FILE, questions)
    out.files[GQA_FILE] = len(questions)
    return out


# --- MMMU -----------------------------------------------------------------------------------------------

MMMU_DIR = "mmmu"
MMMU_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
MMMU_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("options", pa.string()),
        ("explanation", pa.string()),
        *[(f"image_{k}", MMMU_IMAGE) for k in range(1, 8)],
        ("img_type", pa.string()),
        ("answer", pa.string()),
        ("topic_difficulty", pa.string()),
        ("question_type", pa.string()),
        ("subfield", pa.string()),
    ]
)


def mmmu_subject(row: Row) -> str:
    """MMMU groups questions by subject (one folder each): ShapesWorld's subjects are its categories."""
    return "_".join(part.capitalize() for part in FAMILY_CATEGORY[row.family].split("_"))


def write_mmmu(rows: Sequence[Row], root: str, names: Sequence[str]) -> Written:
    """`<subject>/validation-00000-of-00001.parquet` per subject: multiple choice, `<image 1>` in the text."""
    out = Written()
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        subject = mmmu_subject(row)
        choices, gold = multiple_choice(row, names, salt="mmmu")
        row_id = f"validation_{subject}_{len(by_subject.get(subject, [])) + 1}"
        record: dict[str, Any] = {
            "id": row_id,
            "question": f"<image 1> {row.question}",
            "options": repr(choices),  # MMMU stores the options as a Python list literal
            "explanation": "",
            "img_type": "['Diagrams']",
            "answer": LETTERS[gold],
            "topic_difficulty": "Easy" if row.family in ("colour_of", "shape_of", "exists") else "Medium",
            "question_type": "multiple-choice",
            "subfield": row.family,
        }
        for k in range(1, 8):
            record[f"image_{k}"] = {"bytes": row.image, "path": f"{row_id}_1.png"} if k == 1 else None
        by_subject.setdefault(subject, []).append(record)
        out.key(row_id, row)
    if not by_subject:  # the loader wants at least one validation file in the folder
        by_subject["Empty"] = []
    for subject, records in sorted(by_subject.items()):
        rel = f"{MMMU_DIR}/{subject}/validation-00000-of-00001.parquet"
        dio.write_table(pa.Table.from_pylist(records, schema=MMMU_SCHEMA), dio.join(root, rel))
        out.files[rel] = len(records)
    return out


# --- MMBench --------------------------------------------------------------------------------------------

MMBENCH_FILE = "mmbench/MMBench_DEV_EN.tsv"
MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split"]  # fmt: skip


def write_mmbench(rows: Sequence[Row], root: str, names: Sequence[str]) -> Written:
    """One TSV: options in columns A-D (unused ones empty), base64 image, a context hint per question."""
    out = Written()
    records = []
    for i, row in enumerate(rows):
        choices, gold = multiple_choice(row, names, salt="mmbench", max_options=len(LETTERS))
        records.append(
            {
                "index": str(i),
                "question": row.question,
                "hint": HINTS[row.family],
                **{letter: (choices[k] if k < len(choices) else "") for k, letter in enumerate(LETTERS)},
                "answer": LETTERS[gold],
                "category": FAMILY_CATEGORY[row.family],
                "image": base64.b64encode(row.image).decode("ascii"),
                "source": "shapesworld",
                "l2-category": "perception" if row.family != "name_of" else "knowledge",
                "comment": "",
                "split": "dev",
            }
        )
        out.key(i, row)
    buf = io.StringIO()
    pd.DataFrame(records, columns=MMBENCH_COLUMNS).to_csv(buf, sep="\t", index=False)
    dio.write_bytes(dio.join(root, MMBENCH_FILE), buf.getvalue().encode())
    out.files[MMBENCH_FILE] = len(records)
    return out


# --- VizWiz ---------------------------------------------------------------------------------------------


def vizwiz_paths(part: str) -> tuple[str, str]:
    """(annotations, image folder) of VizWiz's `part` ("val" or "train"), relative to the data root."""
    return f"vizwiz/{part}.json", f"vizwiz/{part}"


VIZWIZ_FILE, VIZWIZ_IMAGES = vizwiz_paths("val")


def write_vizwiz(rows: Sequence[Row], root: str, part: str = "val") -> Written:
    """Answerable and unanswerable rows shuffled together (a fixed order), as in VizWiz's val.json (or
    train.json with `part` "train": the validation set of the rehearsal).

    Unanswerable rows carry ten "unanswerable" answers and answer_type "unanswerable", as VizWiz marks them;
    the photos are portrait (`VIZWIZ_ASPECT`).
    """
    file, images = vizwiz_paths(part)
    out = Written()
    order = np.random.default_rng(0).permutation(len(rows))
    annotations = []
    for i, index in enumerate(order):
        row = rows[int(index)]
        image = f"VizWiz_{part}_{i:08d}.jpg"
        answerable = row.answer is not None
        annotations.append(
            {
                "image": image,
                "question": row.question,
                "answers": ten_answers(str(row.answer) if answerable else "unanswerable"),
                "answer_type": ANSWER_TYPE[row.family] if answerable else "unanswerable",
                "answerable": int(answerable),
            }
        )
        put_image(root, images, image, as_photo(row.image, VIZWIZ_ASPECT), out)
        out.key(image, row)
    dump_json(root, file, annotations)
    out.files[file] = len(annotations)
    return out


# --- unanswerable JSONL (BeyondVisQA; ShapesWorld's unanswerable training items) ------------------------


def write_unanswerable_jsonl(
    rows: Sequence[Row], root: str, rel: str, names: Sequence[str], with_choices: bool
) -> Written:
    """The project's documented unanswerable JSONL, images in `images/` beside it (ids are ShapesWorld's).

    `with_choices`: BeyondVisQA style, plausible answers plus the refusal option (picking it is refusing).
    """
    out = Written()
    folder = dio.parent(rel) if "/" in rel else ""
    lines = []
    for row in rows:
        line: dict[str, Any] = {"id": row.id, "image": f"images/{row.id}.png", "question": row.question}
        if with_choices:
            line["choices"] = refusal_choices(row, names, salt="beyondvisqa")
        line["category"] = row.category
        lines.append(line)
        put_image(root, f"{folder}/images" if folder else "images", f"{row.id}.png", row.image, out)
        out.key(row.id, row)
    dump_jsonl(root, rel, lines)
    out.files[rel] = len(lines)
    return out
