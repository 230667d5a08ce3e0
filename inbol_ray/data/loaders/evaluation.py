"""Loaders of the evaluation sets kept as JSON + image folders: A-OKVQA, GQA, VizWiz, unanswerable JSONL."""

from __future__ import annotations

import os
from typing import Any

from inbol_ray import schema as S
from inbol_ray.config import DatasetSpec
from inbol_ray.data import io as dio
from inbol_ray.data.loaders.common import (
    FieldCheck,
    Parsed,
    add_limit,
    answer_letter,
    check_fields,
    expect_type,
    image_location,
    make_bad,
    make_item,
    missing_field,
    path_reason,
    read_json,
    read_jsonl,
    string_list,
)

# --- A-OKVQA --------------------------------------------------------------------------------------------

AOKVQA_FIELDS = ("question_id", "image_id", "question")
AOKVQA_DA_FIELDS = ("direct_answers",)
AOKVQA_MC_FIELDS = ("choices", "correct_choice_idx")


def _parse_aokvqa(spec: DatasetSpec, multiple_choice: bool, out: Parsed | None) -> Parsed:
    out = Parsed() if out is None else out
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


def parse_aokvqa(spec: DatasetSpec, out: Parsed | None = None) -> Parsed:
    """A-OKVQA aokvqa_v1p0_<split>.json, direct-answer (DA) task: the 10 `direct_answers`, metric vqa_soft.

    How it is graded: the free-text response against the ten crowd answers by VQA accuracy
    (`grading.vqa_accuracy`: both sides VQA-normalised - lower case, punctuation, articles, number words to
    digits, contractions - then the mean over the ten leave-one-out subsets of min(1, matches / 3)); the
    response is correct when that reaches `grading.vqa_correct_at` (0.5), i.e. when at least 2 of the 10
    annotators gave it. Why DA and a threshold: s_trust needs a right/wrong/refused call per response, and
    open answers are where a model can hallucinate; the MC task (a guess is right 1 time in 4) is
    `aokvqa_mc`, a separate format.

    Not the benchmark's own DA number: allenai/aokvqa `evaluation/eval_predictions.py` averages a soft score
    per question, min(1, #direct answers equal to the raw prediction string / 3), with no normalisation of
    the prediction and no leave-one-out mean. At 0.5 the two formulas make the same call (1 matching
    annotator: 0.3 here, 1/3 there; 2: 0.6 vs 2/3), but our Acc is the share of questions with >= 2
    agreeing annotators, not the leaderboard's soft accuracy (which also credits 1/3 and 2/3), and our
    normalisation accepts "Two" for "2", which the official string match does not. Questions flagged
    `difficult_direct_answer` are kept and marked in category (`direct_answer_difficult`) so a table can
    leave them out. Images are COCO 2017 `<image_id:012d>.jpg` in `images`.
    """
    return _parse_aokvqa(spec, False, out)


def parse_aokvqa_mc(spec: DatasetSpec, out: Parsed | None = None) -> Parsed:
    """A-OKVQA multiple-choice task from the same file: 4 choices, answer = letter of correct_choice_idx.

    Graded with mc_letter: the option the response picks (its letter, or the option's text) must be the
    gold one, as the official MC score compares the chosen option. Unlike the official script, which scores
    MC only on questions without `difficult_direct_answer`, every question is kept.
    """
    return _parse_aokvqa(spec, True, out)


# --- GQA ------------------------------------------------------------------------------------------------

GQA_FIELDS = ("imageId", "question", "answer")


def parse_gqa(spec: DatasetSpec, out: Parsed | None = None) -> Parsed:
    """GQA questions JSON {qid: question}: short answer, metric exact; images `<images>/<imageId>.jpg`.

    category = types.structural (verify, query, choose, logical, compare) when present.
    """
    out = Parsed() if out is None else out
    questions = expect_type(read_json(spec.path), dict, spec.path, "object {question_id: question}")
    check_fields(questions.values(), GQA_FIELDS, spec.path)
    for qid, q in add_limit(list(questions.items()), spec):
        reason = "row is not a JSON object" if not isinstance(q, dict) else missing_field(q, GQA_FIELDS)
        reason = reason or path_reason("field 'imageId'", q["imageId"])
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
ANSWERABLE_SUFFIX = "_answerable"
ANSWERABLE_SPLIT = "ood_test"
"""Where VizWiz's answerable rows go when the spec is an unanswerable set: blind users' photos (blur,
framing, lighting) are out of domain for a model trained on VQAv2's COCO pictures."""


def vizwiz_answerable_set(spec: DatasetSpec) -> str:
    """The set VizWiz's answerable rows form apart from `spec.name`, or "" when they stay in it.

    Only an unanswerable-test spec splits: its score is the refusal rate, which means something only on
    questions nobody can answer. Under any other split the file's rows stay together, as published.
    """
    return f"{spec.name}{ANSWERABLE_SUFFIX}" if spec.split == "unanswerable_test" else ""


def parse_vizwiz(spec: DatasetSpec, out: Parsed | None = None) -> Parsed:
    """VizWiz VQA annotations (train.json / val.json): 10 answers, metric vqa_soft, answerable from the file.

    `answerable` (0/1) is the annotators' verdict. The paper reports VizWiz as the refusal rate on its
    unanswerable questions, so with spec split `unanswerable_test` only `answerable` 0 rows form the set
    `<name>`, and the `answerable` 1 rows are not dropped but form their own answerable set
    `<name>_answerable` with split `ood_test` (Acc / RefR / s_trust like any out-of-domain set; see
    ANSWERABLE_SPLIT). Under any other split every row stays in `<name>`, answerable or not.

    Ids keep the spec's name in both sets (`<name>:<image>`): the key names a row of the file the spec
    points at. A row is routed by its `answerable` field before the rest of it is checked, so a bad
    answerable row is quarantined (and counted) under `<name>_answerable`; a row whose `answerable` is
    absent or not 0/1 cannot be routed and is quarantined under `<name>`. `limit` counts rows of the file,
    before the split. category = answer_type (yes/no, number, other, unanswerable). Images:
    `<images>/<image>`. Unanswerable rows keep their ten "unanswerable" answers; they are never graded
    correct (answerable is false), only refused or not. An `image` that is not a plain name under
    `images` (`..`, an absolute path, a URI) is quarantined with the value.
    """
    out = Parsed() if out is None else out
    rows = expect_type(read_json(spec.path), list, spec.path, "list of annotations")
    check_fields(rows, VIZWIZ_FIELDS, spec.path)
    answerable_set = vizwiz_answerable_set(spec)
    for number, r in enumerate(add_limit(rows, spec)):
        key = (r.get("image") if isinstance(r, dict) else None) or f"row{number}"
        flag = r.get("answerable") if isinstance(r, dict) else None
        apart = bool(answerable_set) and _is_flag(flag) and bool(flag)
        dataset = answerable_set if apart else spec.name
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
        if not reason and not _is_flag(flag):
            reason = f"field 'answerable' must be 0 or 1, got {flag!r}"
        reason = reason or path_reason("field 'image'", r["image"])
        if reason:
            out.quarantine.append(make_bad(spec, key, spec.path, reason, dataset=dataset))
            continue
        item = make_item(
            spec,
            key,
            source=spec.path,
            question=str(r["question"]),
            answers=answers,
            metric="vqa_soft",
            answerable=bool(flag),
            category=str(r.get("answer_type") or "vizwiz"),
            image_path=image_location(spec.images, str(r["image"])),
        )
        if apart:
            item[S.DATASET], item[S.SPLIT] = answerable_set, ANSWERABLE_SPLIT
        out.items.append(item)
    return out


def _is_flag(value: Any) -> bool:
    """VizWiz writes 0/1; true/false or 1.0 mean the same (they compare equal), "1" or 2 do not."""
    return isinstance(value, (bool, int, float)) and value in (0, 1)


# --- unanswerable JSONL (BeyondVisQA, VQAv2-IDK style) --------------------------------------------------

UNANSWERABLE_FIELDS = ("id", "image", "question")


def _unanswerable_image(spec: DatasetSpec, image: str) -> str:
    if dio.is_uri(image) or os.path.isabs(image):
        return image
    return image_location(spec.images or dio.parent(dio.absolute(spec.path)), image)


def parse_unanswerable_jsonl(spec: DatasetSpec, out: Parsed | None = None) -> Parsed:
    """Our documented JSONL for unanswerable sets; every row has answerable = false.

    One object per line: {"id": str, "image": path, "question": str, "answers": [str] (optional),
    "choices": [str] (optional; BeyondVisQA style, one option is the refusal), "category": str (optional)}.
    `image` is a URI, an absolute path, or relative to `images` (default: the JSONL's folder). A path with
    a `..` component is quarantined: to reach images outside that folder, set `images` to a folder above
    them or write absolute paths.
    metric = mc_letter with choices (answers then hold letters, if any), else exact.

    BeyondVisQA (MM-SAP) gives five options, one of which is "Sorry, I can't help with it" at any position
    (A-E), and counts choosing it as refusing. Keep that option's text as published in `choices`: the
    graders see a response "E" as a refusal because option E's text is one (`grading.is_refusal_response`),
    and nothing is ever graded correct here, so the reported number is the refusal rate.
    """
    out = Parsed() if out is None else out
    fields = FieldCheck(UNANSWERABLE_FIELDS, spec.path)
    for number, r in read_jsonl(spec.path, spec, out):
        fields.see(r)
        key = r.get("id") or f"line{number}"
        reason = missing_field(r, UNANSWERABLE_FIELDS)
        if not reason:  # a URI or an absolute path is documented; a relative one stays under its root
            reason = path_reason("field 'image'", r["image"], inside_root=False)
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
    fields.done()
    return out


def _optional_strings(value: Any, name: str) -> tuple[list[str], str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return [], f"field '{name}' must be a list of strings"
    return list(value), ""
