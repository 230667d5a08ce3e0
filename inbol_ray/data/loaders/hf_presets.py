"""Built-in column maps (`preset`) of the Hugging Face `datasets` releases the LLaVA configs' sets come as.

A release keeps the publisher's rows in its own columns; each map says which columns it reads, how a row
becomes an item (question, answers, choices, metric, category, image bytes) exactly as the published-format
loader of the same set makes it (so a set gives the same items either way: tests/integration/
test_hf_formats.py), and which of the release's splits or configs cannot be graded here and are refused.
Every map cites where its schema comes from: the release's data set card (its `dataset_info` YAML) and,
where lmms-eval reads the release, the lmms-eval task that names the columns
(github.com/EvolvingLMMs-Lab/lmms-eval at 75571cf, lmms_eval/tasks/...).

| preset | sets (7B config) | default config / split | refused |
|---|---|---|---|
| `lmms-lab/VQAv2` | vqav2_val (id_test) | - / validation | `test`, `testdev`: no answers |
| `lmms-lab/GQA` | gqa (ood_test) | `<split>_balanced_instructions` / testdev | test, challenge, submission: no answers |
| `lmms-lab/MMMU` | mmmu (ood_test) | - / validation | `test`: answers hidden |
| `lmms-lab/MMBench`, `lmms-lab/MMBench_EN` | mmbench (ood_test) | `en` / dev | `test`: answers withheld |
| `HuggingFaceM4/A-OKVQA` | aokvqa (aokvqa_mc, ood_test) | - / validation | `test`: no answers |
| `HuggingFaceM4/A-OKVQA:direct_answers` | (aokvqa_da) | - / validation | `test`: no answers |
| `lmms-lab/ScienceQA-IMG`, `lmms-lab/ScienceQA` | scienceqa (train) | - or `ScienceQA-IMG` / train or test | - |
| `lmms-lab/VizWiz-VQA` | vizwiz, vizwiz_train | - / val | every split: no `answerable` flag |

Not here: OVEN (no release keeps its images with `entity_text`), BeyondVisQA (our JSONL), VizWiz (the
release drops the flag the paper's VizWiz score needs; read the original annotations, format `vizwiz`).
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from inbol_ray.config import DatasetSpec
from inbol_ray.data.loaders.common import LETTERS, answer_letter, missing_field, string_list
from inbol_ray.data.loaders.embedded import MMMU_COLUMNS
from inbol_ray.data.loaders.embedded import _mmmu_row as mmmu_item
from inbol_ray.schema import ANSWERS, CATEGORY, CHOICES, IMAGE, METRIC, QUESTION

Fields = dict[str, Any]
"""`make_item` keyword arguments of one row (question, answers, choices, metric, category, image, ...)."""


@dataclass(frozen=True)
class RowContext:
    """What a map knows besides the row: the spec, the release split read, the row's 0-based position in
    that split (the key of releases that dropped the publisher's id)."""

    spec: DatasetSpec
    split: str
    number: int


Mapper = Callable[[Mapping[str, Any], RowContext], tuple[Any, Fields | None, str]]
"""row -> (native key, item fields or None, quarantine reason)."""


def _never(spec: DatasetSpec, split: str, config: str) -> str:
    return ""


@dataclass(frozen=True)
class Preset:
    name: str
    schema: str
    """Where the columns are documented (card URL, lmms-eval task)."""
    required: tuple[str, ...]
    """Columns every file must have (a missing one is a file-level error)."""
    row: Mapper
    split: Callable[[DatasetSpec], str]
    """The release split read when `hf_split` is empty."""
    config: Callable[[str], str] = lambda split: ""
    """The release config read when `hf_config` is empty, given the split ("" = the default config)."""
    optional: tuple[str, ...] = ()
    refuse: Callable[[DatasetSpec, str, str], str] = _never
    """(spec, split, config) -> why this release cannot give gradable items for the spec, or ""."""
    missing_hints: Mapping[str, str] = field(default_factory=dict)
    """Required column -> what its absence means (a release that kept less than grading needs)."""
    images_config: Callable[[str], str] | None = None
    """Releases that keep images in a config of their own (GQA): its name, given the questions' config.
    Rows are joined on `image_key` (questions) = `id` (images)."""
    image_key: str = ""


def image_bytes(value: Any, column: str) -> tuple[bytes | None, str]:
    """A `datasets` Image cell (`{"bytes": ..., "path": ...}`) as encoded bytes, or a reason naming the column."""
    if not isinstance(value, Mapping) or not value.get("bytes"):
        path = value.get("path") if isinstance(value, Mapping) else None
        where = f" (only a path, {path!r}: the release must embed the bytes)" if path else ""
        return None, f"missing field '{column}'{where}"
    return bytes(value["bytes"]), ""


def text_or_empty(value: Any) -> str:
    """Optional text cells: null, blank and pandas' "nan" (lmms-lab's MMBench stores missing hints and
    options so: lmms-eval's mmbench_evals.create_options_prompt and en_utils.mmbench_doc_to_text skip
    `item != "nan"`) all mean absent."""
    text = "" if value is None else str(value)
    return "" if text.strip() in ("", "nan") else text


# --- lmms-lab/VQAv2 -------------------------------------------------------------------------------------
# Card: https://huggingface.co/datasets/lmms-lab/VQAv2/blob/main/README.md - question_type,
# multiple_choice_answer, answers (list of {answer, answer_confidence, answer_id}), image_id, answer_type,
# question_id, question, image; splits validation (214,354), testdev, test; `data/<split>-*` shards.
# lmms-eval: lmms_eval/tasks/vqav2/vqav2_val.yaml (test_split: validation) and utils.py
# (vqav2_process_results: VQA accuracy over doc["answers"][i]["answer"]).


def _vqav2_row(row: Mapping[str, Any], ctx: RowContext) -> tuple[Any, Fields | None, str]:
    key = row.get("question_id")
    reason = missing_field(row, ("question_id", "question", "answers", "answer_type"))
    answers: list[str] = []
    if not reason:
        raw = row["answers"]
        if (
            not isinstance(raw, list)
            or not raw
            or not all(isinstance(a, Mapping) and a.get("answer") for a in raw)
        ):
            reason = "field 'answers' must be a non-empty list of {answer: ...}"
        else:
            answers = [str(a["answer"]) for a in raw]
    image, why = image_bytes(row.get("image"), "image")
    if reason or why:
        return key, None, reason or why
    fields = dict(
        question=str(row["question"]), answers=answers, metric="vqa_soft", category=str(row["answer_type"])
    )
    return key, {**fields, "image": image}, ""


def _vqav2_refuse(spec: DatasetSpec, split: str, config: str) -> str:
    if split in ("test", "testdev"):
        return (
            f"lmms-lab/VQAv2's '{split}' split has no answers (VQAv2 scores test-dev and test on its "
            "evaluation server); read 'validation'"
        )
    return ""


# --- lmms-lab/GQA ---------------------------------------------------------------------------------------
# Card: https://huggingface.co/datasets/lmms-lab/GQA/blob/main/README.md - configs `<split>_<all|balanced>_
# instructions` (id, imageId, question, answer, fullAnswer, isBalanced, groups, types, ... ; the test,
# challenge and submission ones keep only id, imageId, question, isBalanced) and `<split>_<all|balanced>_
# images` (id, image), files `<config>/<split>-*.parquet`. lmms-eval: lmms_eval/tasks/gqa/gqa.yaml
# (dataset_name testdev_balanced_instructions, test_split testdev, doc_to_target answer) and utils.py
# (gqa_process_docs joins the testdev_balanced_images config on doc["imageId"] == row["id"]).

_GQA_UNANSWERED = ("test_", "challenge_", "submission_")


def _gqa_row(row: Mapping[str, Any], ctx: RowContext) -> tuple[Any, Fields | None, str]:
    key = row.get("id")
    reason = missing_field(row, ("id", "imageId", "question", "answer"))
    image, why = image_bytes(row.get("image"), "image")
    if row.get("image") is None and not reason:
        why = f"imageId {row['imageId']!r} has no image in the images config"
    if reason or why:
        return key, None, reason or why
    types = row.get("types") if isinstance(row.get("types"), Mapping) else {}
    category = str(types.get("structural") or "gqa")
    fields = dict(
        question=str(row["question"]), answers=[str(row["answer"])], metric="exact", category=category
    )
    return key, {**fields, "image": image}, ""


def _gqa_refuse(spec: DatasetSpec, split: str, config: str) -> str:
    if not config.endswith("_instructions"):
        return f"lmms-lab/GQA: config {config!r} is not a questions config (`<split>_balanced_instructions`)"
    if config.startswith(_GQA_UNANSWERED):
        return f"lmms-lab/GQA's {config!r} questions carry no answers (GQA scores them on its server)"
    return ""


# --- lmms-lab/MMMU --------------------------------------------------------------------------------------
# Card: https://huggingface.co/datasets/lmms-lab/MMMU/blob/main/README.md ("a merged version of MMMU/MMMU
# with all subsets concatenated"): MMMU's own columns (id, question, options, explanation, image_1 ..
# image_7, img_type, answer, topic_difficulty, question_type, subfield); splits dev, validation, test;
# `data/<split>-*`. lmms-eval: lmms_eval/tasks/mmmu/mmmu_val.yaml (test_split validation) and utils.py
# (ast.literal_eval(doc["options"]), `<image k>` tokens name the image_k columns). Rows map as the `mmmu`
# format's (loaders.embedded).


def _mmmu_row(row: Mapping[str, Any], ctx: RowContext) -> tuple[Any, Fields | None, str]:
    """The `mmmu` format's own row function, so both read a row alike (its item's fields are taken back)."""
    item, reason = mmmu_item(ctx.spec, dict(row), "")
    if item is None:
        return row.get("id"), None, reason
    names = {
        QUESTION: "question",
        ANSWERS: "answers",
        CHOICES: "choices",
        METRIC: "metric",
        CATEGORY: "category",
    }
    return row["id"], {arg: item[column] for column, arg in names.items()} | {"image": item[IMAGE]}, ""


def _mmmu_refuse(spec: DatasetSpec, split: str, config: str) -> str:
    return (
        "MMMU's test answers are hidden (scored on its server); read 'validation'" if split == "test" else ""
    )


# --- lmms-lab/MMBench -----------------------------------------------------------------------------------
# Card: https://huggingface.co/datasets/lmms-lab/MMBench/blob/main/README.md - config `en`: index, question,
# hint, answer, A, B, C, D, category, image, source, L2-category, comment, split; splits dev, test
# (lmms-lab/MMBench_EN: the same columns, default config, `data/<split>-*`). lmms-eval:
# lmms_eval/tasks/mmbench/_default_template_mmbench_en_yaml (dataset_name en), mmbench_en_dev.yaml
# (test_split dev), en_utils.py and mmbench_evals.py (options A-E, "nan" for an absent hint or option).
# Rows map as the `mmbench` format's: choices = the options up to the first absent one, question =
# "<hint>\n<question>" (LLaVA-1.5's llava/eval/model_vqa_mmbench.py).

MMBENCH_OPTIONS = "ABCDE"


def _mmbench_row(row: Mapping[str, Any], ctx: RowContext) -> tuple[Any, Fields | None, str]:
    key = row.get("index")
    reason = missing_field(row, ("index", "question", "answer"))
    choices: list[str] = []
    for letter in MMBENCH_OPTIONS:
        option = text_or_empty(row.get(letter))
        if not option:
            break
        choices.append(option)
    if not reason and len(choices) < 2:
        reason = "fields 'A' and 'B' must both hold options"
    answer = str(row.get("answer") or "").strip()
    if not reason and answer not in LETTERS[: len(choices)]:
        reason = f"field 'answer' ({answer!r}) is not one of the {len(choices)} option letters"
    image, why = image_bytes(row.get("image"), "image")
    if reason or why:
        return key, None, reason or why
    hint = text_or_empty(row.get("hint")).strip()
    question = f"{hint}\n{row['question']}" if hint else str(row["question"])
    category = text_or_empty(row.get("category")) or "mmbench"
    fields = dict(question=question, answers=[answer], choices=choices, metric="mc_letter", category=category)
    return key, {**fields, "image": image}, ""


def _mmbench_refuse(spec: DatasetSpec, split: str, config: str) -> str:
    return "MMBench's test answers are withheld (scored on its server); read 'dev'" if split == "test" else ""


# --- HuggingFaceM4/A-OKVQA ------------------------------------------------------------------------------
# Card: https://huggingface.co/datasets/HuggingFaceM4/A-OKVQA (README at d1b0efa; files
# data/<split>-00000-of-00001-<hash>.parquet; splits train 17,056, validation 1,145, test 6,702). Columns:
# image, question_id, question, choices, correct_choice_idx, direct_answers, difficult_direct_answer,
# rationales - the fields of allenai/aokvqa's aokvqa_v1p0_<split>.json with the COCO image embedded; test
# rows lack correct_choice_idx, direct_answers and rationales. lmms-eval has no A-OKVQA task (and lmms-lab
# no release), so the column names were checked against code that reads this release (e.g. r1_vlm's
# A-OKVQA builder: example["correct_choice_idx"], example["direct_answers"]). `direct_answers` is read
# either as a list or as a string holding the list.


def _aokvqa_common(row: Mapping[str, Any]) -> tuple[Any, str, bytes | None]:
    reason = missing_field(row, ("question_id", "question"))
    image, why = image_bytes(row.get("image"), "image")
    return row.get("question_id"), reason or why, image


def _aokvqa_mc_row(row: Mapping[str, Any], ctx: RowContext) -> tuple[Any, Fields | None, str]:
    key, reason, image = _aokvqa_common(row)
    choices: list[str] = []
    letter = ""
    if not reason:
        choices, reason = string_list(_listed(row.get("choices")), "choices")
    if not reason:
        letter, reason = answer_letter(row.get("correct_choice_idx"), choices, "correct_choice_idx")
    if reason:
        return key, None, reason
    fields = dict(question=str(row["question"]), answers=[letter], choices=choices, metric="mc_letter")
    return key, {**fields, "category": "multiple_choice", "image": image}, ""


def _aokvqa_da_row(row: Mapping[str, Any], ctx: RowContext) -> tuple[Any, Fields | None, str]:
    key, reason, image = _aokvqa_common(row)
    answers: list[str] = []
    if not reason:
        answers, reason = string_list(_listed(row.get("direct_answers")), "direct_answers")
    if reason:
        return key, None, reason
    category = "direct_answer_difficult" if row.get("difficult_direct_answer") else "direct_answer"
    fields = dict(question=str(row["question"]), answers=answers, metric="vqa_soft", category=category)
    return key, {**fields, "image": image}, ""


def _listed(value: Any) -> Any:
    """A list cell, or a string holding a Python/JSON list literal (as some conversions store lists)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _aokvqa_refuse(spec: DatasetSpec, split: str, config: str) -> str:
    if split == "test":
        return "A-OKVQA's test split has no correct_choice_idx or direct_answers (scored on its leaderboard)"
    return ""


# --- lmms-lab/ScienceQA-IMG, lmms-lab/ScienceQA ---------------------------------------------------------
# Cards: https://huggingface.co/datasets/lmms-lab/ScienceQA-IMG/blob/main/README.md (default config,
# data/<split>-*, splits train 6,218, validation 2,097, test 2,017) and
# https://huggingface.co/datasets/lmms-lab/ScienceQA/blob/main/README.md (configs ScienceQA-IMG and
# ScienceQA-FULL, `<config>/<split>-*`). Columns: image, question, choices, answer (int8 index), hint,
# task, grade, subject, topic, category, skill, lecture, solution - ScienceQA's problems.json fields but no
# problem id, so a row's key is its position in the split (stable for one revision). lmms-eval:
# lmms_eval/tasks/scienceqa/scienceqa_img.yaml (dataset_name ScienceQA-IMG, test_split test) and utils.py
# (sqa_doc_to_target: the letter of doc["answer"]; "Context: " + hint). Rows map as the `scienceqa`
# format's: question "Context: <hint>\n<question>", answer letter, category subject.


def _scienceqa_row(row: Mapping[str, Any], ctx: RowContext) -> tuple[Any, Fields | None, str]:
    key = f"{ctx.split}-{ctx.number}"
    reason = missing_field(row, ("question", "choices", "answer"))
    image: bytes | None = None
    if not reason and row.get("image") is None:
        if not ctx.spec.text_only:
            reason = "skipped: field 'image' is null (text-only question; set text_only: true to load it)"
    elif not reason:
        image, reason = image_bytes(row["image"], "image")
    choices: list[str] = []
    letter = ""
    if not reason:
        choices, reason = string_list(row["choices"], "choices")
    if not reason:
        letter, reason = answer_letter(row["answer"], choices, "answer")
    if reason:
        return key, None, reason
    hint = text_or_empty(row.get("hint")).strip()
    question = f"Context: {hint}\n{row['question']}" if hint else str(row["question"])
    category = text_or_empty(row.get("subject")) or "scienceqa"
    fields = dict(question=question, answers=[letter], choices=choices, metric="mc_letter", category=category)
    return key, {**fields, "image": image}, ""


def scienceqa_release_split(spec: DatasetSpec) -> str:
    """As the `scienceqa` format: the release's `train` for training, its `test` for anything else."""
    return "train" if spec.split == "train" else "test"


# --- lmms-lab/VizWiz-VQA (refused) ----------------------------------------------------------------------
# Card: https://huggingface.co/datasets/lmms-lab/VizWiz-VQA/blob/main/README.md - question_id, image,
# question, answers (list of strings), category; splits val (4,319), test (8,000). lmms-eval:
# lmms_eval/tasks/vizwiz_vqa/ (test_split val, VQA accuracy over doc["answers"]). VizWiz's `answerable`
# flag is not among the columns (whether `category` is the answer type is not documented), and the
# paper's VizWiz number is the refusal rate on the unanswerable questions: without the flag no row can
# be put in the set it belongs to, nor graded (an unanswerable row is never correct), so it is refused.


def _vizwiz_refuse(spec: DatasetSpec, split: str, config: str) -> str:
    return (
        "lmms-lab/VizWiz-VQA drops VizWiz's `answerable` flag (columns: question_id, image, question, "
        "answers, category), which the paper's VizWiz score needs (the refusal rate on the unanswerable "
        "questions, answerable rows scored apart); read VizWiz's own annotations (val.json / train.json) "
        "with format vizwiz instead"
    )


def _refused_row(row: Mapping[str, Any], ctx: RowContext) -> tuple[Any, Fields | None, str]:
    raise AssertionError("a refused release is never read")


# --- the table ------------------------------------------------------------------------------------------

_VQAV2 = Preset(
    name="lmms-lab/VQAv2",
    schema="https://huggingface.co/datasets/lmms-lab/VQAv2 (card); lmms-eval lmms_eval/tasks/vqav2/",
    required=("question_id", "question", "answers", "answer_type", "image"),
    row=_vqav2_row,
    split=lambda spec: "validation",
    refuse=_vqav2_refuse,
    missing_hints={
        "answers": "the release keeps no annotator answers (one `multiple_choice_answer` is not enough: "
        "VQA accuracy needs the ten answers)"
    },
)
_GQA = Preset(
    name="lmms-lab/GQA",
    schema="https://huggingface.co/datasets/lmms-lab/GQA (card); lmms-eval lmms_eval/tasks/gqa/",
    required=("id", "imageId", "question", "answer"),
    optional=("types",),
    row=_gqa_row,
    split=lambda spec: "testdev",
    config=lambda split: f"{split}_balanced_instructions",
    refuse=_gqa_refuse,
    missing_hints={"answer": "these GQA questions carry no answers (test, challenge, submission)"},
    images_config=lambda config: config.replace("_instructions", "_images"),
    image_key="imageId",
)
_MMMU = Preset(
    name="lmms-lab/MMMU",
    schema="https://huggingface.co/datasets/lmms-lab/MMMU (card); lmms-eval lmms_eval/tasks/mmmu/",
    required=MMMU_COLUMNS,
    optional=tuple(f"image_{k}" for k in range(2, 8)),
    row=_mmmu_row,
    split=lambda spec: "validation",
    refuse=_mmmu_refuse,
)
_MMBENCH_COLUMNS = ("index", "question", "answer", "image", "A", "B")
_MMBENCH_OPTIONAL = ("hint", "C", "D", "E", "category")
_MMBENCH = Preset(
    name="lmms-lab/MMBench",
    schema="https://huggingface.co/datasets/lmms-lab/MMBench (card, config en); lmms-eval "
    "lmms_eval/tasks/mmbench/",
    required=_MMBENCH_COLUMNS,
    optional=_MMBENCH_OPTIONAL,
    row=_mmbench_row,
    split=lambda spec: "dev",
    config=lambda split: "en",
    refuse=_mmbench_refuse,
)
_AOKVQA_FIELDS = ("question_id", "question", "image")
_AOKVQA = Preset(
    name="HuggingFaceM4/A-OKVQA",
    schema="https://huggingface.co/datasets/HuggingFaceM4/A-OKVQA (card); fields of allenai/aokvqa",
    required=(*_AOKVQA_FIELDS, "choices", "correct_choice_idx"),
    row=_aokvqa_mc_row,
    split=lambda spec: "validation",
    refuse=_aokvqa_refuse,
)
_SCIENCEQA = Preset(
    name="lmms-lab/ScienceQA-IMG",
    schema="https://huggingface.co/datasets/lmms-lab/ScienceQA-IMG (card); lmms-eval "
    "lmms_eval/tasks/scienceqa/scienceqa_img.yaml",
    required=("question", "choices", "answer", "image"),
    optional=("hint", "subject"),
    row=_scienceqa_row,
    split=scienceqa_release_split,
)
_VIZWIZ = Preset(
    name="lmms-lab/VizWiz-VQA",
    schema="https://huggingface.co/datasets/lmms-lab/VizWiz-VQA (card); lmms-eval lmms_eval/tasks/vizwiz_vqa/",
    required=("question_id", "question", "answers", "image"),
    row=_refused_row,
    split=lambda spec: "val",
    refuse=_vizwiz_refuse,
)

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        _VQAV2,
        _GQA,
        _MMMU,
        _MMBENCH,
        replace(_MMBENCH, name="lmms-lab/MMBench_EN", config=lambda split: ""),
        _AOKVQA,
        replace(
            _AOKVQA,
            name="HuggingFaceM4/A-OKVQA:direct_answers",
            required=(*_AOKVQA_FIELDS, "direct_answers"),
            optional=("difficult_direct_answer",),
            row=_aokvqa_da_row,
        ),
        _SCIENCEQA,
        replace(_SCIENCEQA, name="lmms-lab/ScienceQA", config=lambda split: "ScienceQA-IMG"),
        _VIZWIZ,
    )
}
"""Every built-in map by the name a spec's `preset` gives (the release's Hub id; `:task` for a second task)."""
