"""Loaders of the evaluation sets kept as JSON + image folders: A-OKVQA, GQA, VizWiz, unanswerable JSONL."""

from __future__ import annotations

import os
from typing import Any

from inbol_ray.config import DatasetSpec
from inbol_ray.data import io as dio
from inbol_ray.data.loaders.common import (
    Parsed,
    add_limit,
    answer_letter,
    check_fields,
    expect_type,
    image_location,
    make_bad,
    make_item,
    missing_field,
    read_json,
    read_jsonl,
    string_list,
)

# --- A-OKVQA --------------------------------------------------------------------------------------------

AOKVQA_FIELDS = ("question_id", "image_id", "question")
AOKVQA_DA_FIELDS = ("direct_answers",)
AOKVQA_MC_FIELDS = ("choices", "correct_choice_idx")


def _parse_aokvqa(spec: DatasetSpec, multiple_choice: bool) -> Parsed:
    out = Parsed()
    rows = expect_type(read_json(spec.path), list, spec.path, "list of questions")
    task_fields = AOKVQA_MC_FIELDS if multiple_choice else AOKVQA_DA_FIELDS
    check_fields(rows, (*AOKVQA_FIELDS, *task_fields), spec.path)
    for number, r in enumerate(add_limit(rows, spec)):
        key = (r.get("question_id") if isinstance(r, dict) else None) or f"row{number}"
        reason = "row is not a JSON object" if not isinstance(r, dict) else missing_field(r, AOKVQA_FIELDS)
        if not reason and not isinstance(r["image_id"], int):
            reason = f"field 'image_id' must be an integer, got {r['image_id']!r}"
        answers: list[str] = []
        choices: list[str] | None = None
        if not reason and multiple_choice:
            choices, reason = string_list(r.get("choices"), "choices")
            letter = ""
            if not reason:
                letter, reason = answer_letter(r.get("correct_choice_idx"), choices, "correct_choice_idx")
            answers = [letter]
        elif not reason:
            answers, reason = string_list(r.get("direct_answers"), "direct_answers")
        if reason:
            out.quarantine.append(make_bad(spec, key, spec.path, reason))
            continue
        if multiple_choice:
            category = "multiple_choice"
        else:
            category = "direct_answer_difficult" if r.get("difficult_direct_answer") else "direct_answer"
        out.items.append(
            make_item(
                spec,
                key,
                source=spec.path,
                question=str(r["question"]),
                answers=answers,
                choices=choices,
                metric="mc_letter" if multiple_choice else "vqa_soft",
                category=category,
                image_path=image_location(spec.images, f"{r['image_id']:012d}.jpg"),
            )
        )
    return out


def parse_aokvqa(spec: DatasetSpec) -> Parsed:
    """A-OKVQA aokvqa_v1p0_<split>.json, direct-answer task: the 10 direct_answers, metric vqa_soft.

    Images are COCO 2017 `<image_id:012d>.jpg` in `images`; category marks `difficult_direct_answer`.
    """
    return _parse_aokvqa(spec, multiple_choice=False)


def parse_aokvqa_mc(spec: DatasetSpec) -> Parsed:
    """A-OKVQA multiple-choice task from the same file: 4 choices, answer = letter of correct_choice_idx."""
    return _parse_aokvqa(spec, multiple_choice=True)


# --- GQA ------------------------------------------------------------------------------------------------

GQA_FIELDS = ("imageId", "question", "answer")


def parse_gqa(spec: DatasetSpec) -> Parsed:
    """GQA questions JSON {qid: question}: short answer, metric exact; images `<images>/<imageId>.jpg`.

    category = types.structural (verify, query, choose, logical, compare) when present.
    """
    out = Parsed()
    questions = expect_type(read_json(spec.path), dict, spec.path, "object {question_id: question}")
    check_fields(questions.values(), GQA_FIELDS, spec.path)
    for qid, q in add_limit(list(questions.items()), spec):
        reason = "row is not a JSON object" if not isinstance(q, dict) else missing_field(q, GQA_FIELDS)
        if reason:
            out.quarantine.append(make_bad(spec, qid, spec.path, reason))
            continue
        types = q.get("types") if isinstance(q.get("types"), dict) else {}
        out.items.append(
            make_item(
                spec,
                qid,
                source=spec.path,
                question=str(q["question"]),
                answers=[str(q["answer"])],
                metric="exact",
                category=str(types.get("structural") or "gqa"),
                image_path=image_location(spec.images, f"{q['imageId']}.jpg"),
            )
        )
    return out


# --- VizWiz ---------------------------------------------------------------------------------------------

VIZWIZ_FIELDS = ("image", "question", "answers", "answerable")


def parse_vizwiz(spec: DatasetSpec) -> Parsed:
    """VizWiz VQA annotations (train.json / val.json): 10 answers, metric vqa_soft, answerable from the file.

    `answerable` (0/1) is the annotators' verdict; unanswerable rows are what the refusal rate is measured
    on. category = answer_type (yes/no, number, other, unanswerable). Images: `<images>/<image>`.
    """
    out = Parsed()
    rows = expect_type(read_json(spec.path), list, spec.path, "list of annotations")
    check_fields(rows, VIZWIZ_FIELDS, spec.path)
    for number, r in enumerate(add_limit(rows, spec)):
        key = (r.get("image") if isinstance(r, dict) else None) or f"row{number}"
        reason = "row is not a JSON object" if not isinstance(r, dict) else missing_field(r, VIZWIZ_FIELDS)
        answers: list[str] = []
        if not reason:
            raw = r["answers"]
            if (
                not isinstance(raw, list)
                or not raw
                or not all(isinstance(a, dict) and "answer" in a for a in raw)
            ):
                reason = "field 'answers' must be a non-empty list of {answer: ...} objects"
            else:
                answers = [str(a["answer"]) for a in raw]
        if not reason and r["answerable"] not in (0, 1):  # True/False compare equal to 1/0
            reason = f"field 'answerable' must be 0 or 1, got {r['answerable']!r}"
        if reason:
            out.quarantine.append(make_bad(spec, key, spec.path, reason))
            continue
        out.items.append(
            make_item(
                spec,
                key,
                source=spec.path,
                question=str(r["question"]),
                answers=answers,
                metric="vqa_soft",
                answerable=bool(r["answerable"]),
                category=str(r.get("answer_type") or "vizwiz"),
                image_path=image_location(spec.images, str(r["image"])),
            )
        )
    return out


# --- unanswerable JSONL (BeyondVisQA, VQAv2-IDK style) --------------------------------------------------

UNANSWERABLE_FIELDS = ("id", "image", "question")


def _unanswerable_image(spec: DatasetSpec, image: str) -> str:
    if dio.is_uri(image) or os.path.isabs(image):
        return image
    return image_location(spec.images or dio.parent(dio.absolute(spec.path)), image)


def parse_unanswerable_jsonl(spec: DatasetSpec) -> Parsed:
    """Our documented JSONL for unanswerable sets; every row has answerable = false.

    One object per line: {"id": str, "image": path, "question": str, "answers": [str] (optional),
    "choices": [str] (optional; BeyondVisQA style, one option is the refusal), "category": str (optional)}.
    `image` is a URI, an absolute path, or relative to `images` (default: the JSONL's folder).
    metric = mc_letter with choices (answers then hold letters, if any), else exact.
    """
    out = Parsed()
    rows = read_jsonl(spec.path, spec, out)
    check_fields([r for _, r in rows], UNANSWERABLE_FIELDS, spec.path)
    for number, r in rows:
        key = r.get("id") or f"line{number}"
        reason = missing_field(r, UNANSWERABLE_FIELDS)
        answers: list[str] = []
        choices: list[str] | None = None
        if not reason and r.get("answers") is not None:
            answers, reason = _optional_strings(r["answers"], "answers")
        if not reason and r.get("choices") is not None:
            choices, reason = string_list(r["choices"], "choices")
            if not reason and len(choices) < 2:
                reason = "field 'choices' needs at least 2 options"
        if reason:
            out.quarantine.append(make_bad(spec, key, spec.path, reason))
            continue
        out.items.append(
            make_item(
                spec,
                key,
                source=spec.path,
                question=str(r["question"]),
                answers=answers,
                choices=choices,
                metric="mc_letter" if choices else "exact",
                answerable=False,
                category=str(r.get("category") or "unanswerable"),
                image_path=_unanswerable_image(spec, str(r["image"])),
            )
        )
    return out


def _optional_strings(value: Any, name: str) -> tuple[list[str], str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return [], f"field '{name}' must be a list of strings"
    return list(value), ""
