"""Writers of the training sets' published files: VQAv2 (also its val split), ScienceQA, OVEN.

Each writer lays its files out as the publisher does (and as `inbol_ray.data.loaders.training` reads them)
and returns what it wrote: rows per file, and the native key of every row with the ShapesWorld id it came
from, since the formats' own keys (question ids, pids) cannot carry ours.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from inbol_ray.data import io as dio
from inbol_ray.data.coco_categories import write_instances
from inbol_ray.data.export.questions import (
    ANSWER_TYPE,
    FAMILY_CATEGORY,
    HINTS,
    Row,
    multiple_choice,
    question_type,
)
from inbol_ray.data.images import decode_image

N_ANNOTATORS = 10  # VQAv2, A-OKVQA and VizWiz keep ten human answers per question


@dataclass
class Written:
    """What one writer put under the export root: rows per file (relative path), and key -> ShapesWorld id."""

    files: dict[str, int] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)

    def key(self, key: Any, row: Row) -> None:
        key = str(key)
        if key in self.ids:
            raise ValueError(f"exported key {key!r} given twice ({self.ids[key]} and {row.id})")
        self.ids[key] = row.id


def dump_json(root: str, rel: str, obj: Any) -> None:
    dio.write_bytes(dio.join(root, rel), (json.dumps(obj, indent=1) + "\n").encode())


def dump_jsonl(root: str, rel: str, objs: Sequence[dict[str, Any]]) -> None:
    dio.write_bytes(dio.join(root, rel), "".join(json.dumps(o) + "\n" for o in objs).encode())


def put_image(root: str, folder: str, name: str, data: bytes, out: Written) -> None:
    """Encoded bytes as they are (PNG for ShapesWorld) under the publisher's file name; the project reads
    images by content, so a `.jpg` name holding PNG bytes decodes to the same pixels."""
    dio.write_bytes(dio.join(root, folder, name), data)
    out.files[folder + "/"] = out.files.get(folder + "/", 0) + 1


COCO_ASPECT = (4, 3)
"""Width:height of a typical COCO photo (640x480): VQAv2's and A-OKVQA's images."""
VIZWIZ_ASPECT = (3, 4)
"""Width:height of a phone photo taken upright, as most of VizWiz's blind users' photos are."""


def as_photo(data: bytes, aspect: tuple[int, int]) -> bytes:
    """The (square) ShapesWorld scene stretched to the real set's photo shape, as PNG.

    Why: COCO's and VizWiz's photos are not square, and how the model squares a photo (`model.image_aspect`:
    LLaVA-1.5's pad, or the processor's centre crop) only matters for photos that are not; square exports
    would leave that path untried. Stretched, not cropped or padded here: the whole scene stays in the
    picture, so every question stays answerable from it, and a centre crop visibly costs the edge cells
    while pad keeps them. Nearest-neighbour keeps ShapesWorld's flat colours exact (no blended edges for a
    colour question), and resizing the photo back to the scene's size gives its pixels back exactly.
    """
    image = decode_image(data)
    side, scale = min(image.size), min(aspect)
    size = (round(side * aspect[0] / scale), round(side * aspect[1] / scale))
    buf = io.BytesIO()
    image.resize(size, Image.Resampling.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def ten_answers(answer: str) -> list[dict[str, Any]]:
    """Ten annotators who all agree: ShapesWorld's one answer is right by construction."""
    return [{"answer": answer, "answer_confidence": "yes"} for _ in range(N_ANNOTATORS)]


# --- VQAv2 ----------------------------------------------------------------------------------------------


def vqav2_paths(subtype: str) -> tuple[str, str, str]:
    """(questions, annotations, image folder) of one VQAv2 split, as the release names them."""
    return (
        f"vqav2/v2_OpenEnded_mscoco_{subtype}_questions.json",
        f"vqav2/v2_mscoco_{subtype}_annotations.json",
        f"coco/{subtype}",
    )


def write_vqav2(rows: Sequence[Row], root: str, subtype: str) -> Written:
    """Open questions; one COCO-named 4:3 photo per question, question_id = image_id * 1000 as in VQAv2."""
    out = Written()
    questions_rel, annotations_rel, images_rel = vqav2_paths(subtype)
    questions, annotations = [], []
    for i, row in enumerate(rows):
        image_id = i + 1
        qid = image_id * 1000
        questions.append({"image_id": image_id, "question": row.question, "question_id": qid})
        annotations.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "question_type": question_type(row.question),
                "answer_type": ANSWER_TYPE[row.family],
                "multiple_choice_answer": row.answer,
                "answers": [{**a, "answer_id": k + 1} for k, a in enumerate(ten_answers(str(row.answer)))],
            }
        )
        photo = as_photo(row.image, COCO_ASPECT)
        put_image(root, images_rel, f"COCO_{subtype}_{image_id:012d}.jpg", photo, out)
        out.key(qid, row)
    head = {"info": {"description": "ShapesWorld in VQAv2's layout"}, "license": {}, "data_subtype": subtype}
    dump_json(
        root,
        questions_rel,
        {**head, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions},
    )
    dump_json(root, annotations_rel, {**head, "data_type": "mscoco", "annotations": annotations})
    out.files[questions_rel] = len(questions)
    out.files[annotations_rel] = len(annotations)
    if subtype == "train2014":  # the LLaVA configs' absence evidence for mismatched training questions
        instances = f"coco/annotations/instances_{subtype}.json"
        write_instances(dio.join(root, instances), range(1, len(rows) + 1), split=subtype)
        out.files[instances] = len(rows)
    return out


# --- ScienceQA ------------------------------------------------------------------------------------------

SCIENCEQA_PROBLEMS = "scienceqa/problems.json"
SCIENCEQA_IMAGES = "scienceqa/images"


def write_scienceqa(rows: Sequence[Row], root: str, names: Sequence[str]) -> Written:
    """Closed-choice image problems of ScienceQA's `train` split, each with a context `hint`."""
    out = Written()
    problems: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        pid = str(i + 1)
        choices, answer = multiple_choice(row, names, salt="scienceqa")
        problems[pid] = {
            "question": row.question,
            "choices": choices,
            "answer": answer,
            "hint": HINTS[row.family],
            "image": "image.png",
            "task": "closed choice",
            "grade": "grade1",
            "subject": "natural science",
            "topic": "shapesworld",
            "category": FAMILY_CATEGORY[row.family],
            "skill": row.family,
            "lecture": "",
            "solution": f"The answer is {row.answer}.",
            "split": "train",
        }
        put_image(root, f"{SCIENCEQA_IMAGES}/train/{pid}", "image.png", row.image, out)
        out.key(pid, row)
    # ScienceQA keeps one folder per problem: report them as one entry, not one per pid.
    out.files = {f"{SCIENCEQA_IMAGES}/train/": len(rows)}
    dump_json(root, SCIENCEQA_PROBLEMS, problems)
    out.files[SCIENCEQA_PROBLEMS] = len(problems)
    return out


# --- OVEN -----------------------------------------------------------------------------------------------

OVEN_ENTITY = "oven/oven_entity_train.jsonl"
OVEN_QUERY = "oven/oven_query_train.jsonl"
OVEN_IMAGES = "oven/oven_images"


def write_oven(rows: Sequence[Row], root: str, task: str = "entity") -> Written:
    """Entity questions whose answer is an invented name, images sharded by the id's first two digits.

    `task`: OVEN's two training files, `entity` (oven_entity_train.jsonl) and `query`
    (oven_query_train.jsonl); one image folder serves both, so their image ids never collide."""
    out = Written()
    lines = []
    path = {"entity": OVEN_ENTITY, "query": OVEN_QUERY}[task]
    offset = 0 if task == "entity" else 50_000_000
    for i, row in enumerate(rows):
        image_id = f"oven_{offset + i:08d}"
        data_id = f"oven_{task}_train_{i:08d}"
        lines.append(
            {
                "data_id": data_id,
                "image_id": image_id,
                "question": row.question,
                "entity_id": f"Q{zlib.crc32(str(row.answer).encode()) % 10**8}",  # Wikidata-style id
                "entity_text": row.answer,
                "data_split": "train",
            }
        )
        put_image(root, f"{OVEN_IMAGES}/{image_id[5:7]}", f"{image_id}.jpg", row.image, out)
        out.key(data_id, row)
    dump_jsonl(root, path, lines)
    out.files[path] = len(lines)
    return out
