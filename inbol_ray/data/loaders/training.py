"""Loaders of the training data sets: VQAv2, ScienceQA (image questions) and OVEN (entity answers)."""

from __future__ import annotations

import re

from inbol_ray.config import DatasetSpec
from inbol_ray.data import io as dio
from inbol_ray.data.loaders.common import (
    DataFormatError,
    FieldCheck,
    Parsed,
    add_limit,
    answer_letter,
    check_fields,
    expect_key,
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

# --- VQAv2 ----------------------------------------------------------------------------------------------

_VQA_QUESTIONS = re.compile(r"^(?P<prefix>.*)OpenEnded_mscoco_(?P<subtype>\w+?)_questions\.json$")
VQAV2_QUESTION_FIELDS = ("question_id", "image_id", "question")
VQAV2_ANNOTATION_FIELDS = ("question_id", "answers", "answer_type")


def vqav2_annotations_path(questions_uri: str) -> str:
    """`v2_OpenEnded_mscoco_train2014_questions.json` -> `v2_mscoco_train2014_annotations.json` beside it.

    The VQA release names the two files of a split this way, so one `path` in the config is enough.
    """
    folder, name = questions_uri.rstrip("/").rsplit("/", 1) if "/" in questions_uri else (".", questions_uri)
    match = _VQA_QUESTIONS.match(name)
    if not match:
        raise DataFormatError(
            f"{questions_uri}: not a VQAv2 questions file name (expected v2_OpenEnded_mscoco_<split>_questions.json)"
        )
    return f"{folder}/{match['prefix']}mscoco_{match['subtype']}_annotations.json"


def parse_vqav2(spec: DatasetSpec, out: Parsed | None = None) -> Parsed:
    """VQAv2: questions JSON + annotations JSON joined on question_id; COCO 2014 images; metric vqa_soft.

    answers = the 10 annotator answers (duplicates kept: VQA accuracy counts agreement); category =
    answer_type (yes/no, number, other). Images are `COCO_<data_subtype>_<image_id:012d>.jpg` in `images`.
    """
    out = Parsed() if out is None else out
    questions_doc = read_json(spec.path)
    questions = expect_key(questions_doc, "questions", spec.path)
    annotations_uri = vqav2_annotations_path(spec.path)  # also checks the file name follows the release
    subtype = (
        questions_doc.get("data_subtype") or _VQA_QUESTIONS.match(spec.path.rsplit("/", 1)[-1])["subtype"]
    )
    if reason := path_reason("field 'data_subtype'", subtype):  # one value names every row's image
        raise DataFormatError(f"{spec.path}: {reason}")
    annotations = expect_key(read_json(annotations_uri), "annotations", annotations_uri)
    check_fields(questions, VQAV2_QUESTION_FIELDS, spec.path)
    check_fields(annotations, VQAV2_ANNOTATION_FIELDS, annotations_uri)
    by_qid = {a.get("question_id"): a for a in annotations if isinstance(a, dict)}

    for number, q in enumerate(add_limit(questions, spec)):
        key = q.get("question_id") if isinstance(q, dict) else None
        key = f"row{number}" if key is None else key
        reason = (
            "row is not a JSON object" if not isinstance(q, dict) else missing_field(q, VQAV2_QUESTION_FIELDS)
        )
        ann = by_qid.get(q.get("question_id")) if not reason else None
        if not reason and ann is None:
            reason = f"no annotation with this 'question_id' in {annotations_uri}"
        if not reason:
            reason = missing_field(ann, VQAV2_ANNOTATION_FIELDS)
        answers: list[str] = []
        if not reason:
            raw = ann["answers"]
            if (
                not isinstance(raw, list)
                or not all(isinstance(a, dict) and "answer" in a for a in raw)
                or not raw
            ):
                reason = "field 'answers' must be a non-empty list of {answer: ...} objects"
            else:
                answers = [str(a["answer"]) for a in raw]
        if not reason and not isinstance(q["image_id"], int):
            reason = f"field 'image_id' must be an integer, got {q['image_id']!r}"
        if reason:
            out.quarantine.append(make_bad(spec, key, spec.path, reason))
            continue
        out.items.append(
            make_item(
                spec,
                key,
                source=spec.path,
                question=q["question"],
                answers=answers,
                metric="vqa_soft",
                category=str(ann["answer_type"]),
                image_path=image_location(spec.images, f"COCO_{subtype}_{q['image_id']:012d}.jpg"),
            )
        )
    return out


# --- ScienceQA ------------------------------------------------------------------------------------------

SCIENCEQA_FIELDS = ("question", "choices", "answer", "split")


def scienceqa_split(spec: DatasetSpec) -> str:
    """Which ScienceQA split a spec reads: its `train` for training, its `test` for anything else."""
    return "train" if spec.split == "train" else "test"


def parse_scienceqa(spec: DatasetSpec, out: Parsed | None = None) -> Parsed:
    """ScienceQA problems.json {pid: problem}: image questions of one publisher split; metric mc_letter.

    Only problems of `scienceqa_split(spec)` are input rows (reading another split is like reading another
    file). Text-only problems (`image` null) are quarantined as skipped, so the counts still add up, unless
    the spec keeps them (`text_only`: items without an image).
    question = "Context: <hint>\\n<question>" when there is a hint (LLaVA's ScienceQA prompt); answers = the
    letter of `answer`; category = subject. Images: `<images>/<split>/<pid>/<image>`.
    """
    out = Parsed() if out is None else out
    problems = expect_type(read_json(spec.path), dict, spec.path, "object {pid: problem}")
    check_fields(problems.values(), (*SCIENCEQA_FIELDS, "image"), spec.path)
    wanted = scienceqa_split(spec)
    selected = [
        (pid, p) for pid, p in problems.items() if not isinstance(p, dict) or p.get("split") == wanted
    ]
    for pid, p in add_limit(selected, spec):
        reason = "row is not a JSON object" if not isinstance(p, dict) else missing_field(p, SCIENCEQA_FIELDS)
        choices: list[str] = []
        letter = ""
        if not reason and not p.get("image") and not spec.text_only:
            reason = "skipped: field 'image' is null (text-only question; set text_only: true to load it)"
        if not reason and p.get("image"):  # both name parts of the image path
            image = p["image"]
            reason = "field 'image' must be a string" if not isinstance(image, str) else ""
            reason = reason or path_reason("problem id", pid) or path_reason("field 'image'", image)
        if not reason:
            choices, reason = string_list(p["choices"], "choices")
        if not reason:
            letter, reason = answer_letter(p["answer"], choices, "answer")
        if reason:
            out.quarantine.append(make_bad(spec, pid, spec.path, reason))
            continue
        hint = str(p.get("hint") or "").strip()
        out.items.append(
            make_item(
                spec,
                pid,
                source=spec.path,
                question=f"Context: {hint}\n{p['question']}" if hint else p["question"],
                answers=[letter],
                choices=choices,
                metric="mc_letter",
                category=str(p.get("subject") or "scienceqa"),
                image_path=image_location(spec.images, p["split"], str(pid), p["image"])
                if p["image"]
                else None,
            )
        )
    return out


# --- OVEN -----------------------------------------------------------------------------------------------

OVEN_FIELDS = ("data_id", "image_id", "question", "entity_text")
_OVEN_EXTENSIONS = (".jpg", ".JPEG", ".jpeg", ".png")


def oven_image_layout(images: str, image_id: str) -> tuple[bool, str]:
    """Find how an OVEN image folder is laid out from one image: (sharded?, extension).

    The OVEN snapshot shards `oven_images/<first two digits>/<image_id>.<ext>`; flat folders are common
    after re-packaging. Probing one row is one or a few `stat` calls, where listing millions of files is not.
    Falls back to sharded `.jpg`; rows whose file is then missing are quarantined by the image stage.
    """
    for sharded in (True, False):
        for ext in _OVEN_EXTENSIONS:
            if dio.exists(_oven_path(images, image_id, sharded, ext)):
                return sharded, ext
    return True, ".jpg"


def _oven_path(images: str, image_id: str, sharded: bool, ext: str) -> str:
    name = f"{image_id}{ext}"
    if sharded:
        return image_location(images, image_id.rsplit("_", 1)[-1][:2], name)
    return image_location(images, name)


def parse_oven(spec: DatasetSpec, out: Parsed | None = None) -> Parsed:
    """OVEN jsonl (oven_entity_* / oven_query_*): entity recognition as VQA with the entity name as answer.

    answers = [entity_text] (the Wikipedia title), category = data_split (e.g. val_entity_seen).

    How it is graded: metric `exact` - the response and `entity_text` both go through VQA answer
    normalisation (`grading.answer_key`: lower case, punctuation, articles, number words to digits,
    contractions) and must then be equal. Why: InBoL trains on OVEN and never reports it, so what matters is
    a right/wrong call per sample for conf = #correct / K; one gold name has no annotator agreement to
    soften (vqa_soft would cap a single answer at 1/3).

    Not the benchmark's scoring: OVEN scores the predicted *entity* (`entity_id`, a Wikidata id) against
    the gold one, after linking a generative model's free text to one of its ~6M Wikipedia entities (BM25
    over entity names in the OVEN paper), and reports accuracy on seen and unseen entities and their
    harmonic mean. Without that entity list there is no linking and no aliases: only the one title counts,
    so "Mercury" is wrong for "Mercury (planet)" (normalised "mercury planet") and "Big Ben" for "Elizabeth
    Tower", while articles and case do not matter ("the Eiffel Tower" = "Eiffel Tower"). conf on OVEN items
    is therefore at most what entity linking would give: more of them land in `unknown` (refusal targets)
    than the benchmark would call wrong.
    """
    out = Parsed() if out is None else out
    fields = FieldCheck(OVEN_FIELDS, spec.path)
    layout: tuple[bool, str] | None = None
    for number, r in read_jsonl(spec.path, spec, out):
        fields.see(r)
        key = r.get("data_id") or f"line{number}"
        reason = missing_field(r, OVEN_FIELDS) or path_reason("field 'image_id'", r["image_id"])
        if reason:
            out.quarantine.append(make_bad(spec, key, spec.path, reason))
            continue
        image_id = str(r["image_id"])
        if layout is None:
            layout = oven_image_layout(spec.images, image_id)
        out.items.append(
            make_item(
                spec,
                key,
                source=spec.path,
                question=str(r["question"]),
                answers=[str(r["entity_text"])],
                metric="exact",
                category=str(r.get("data_split") or "entity"),
                image_path=_oven_path(spec.images, image_id, *layout),
            )
        )
    fields.done()
    return out
