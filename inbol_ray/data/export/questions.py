"""What the exporters need to know about a ShapesWorld question beyond its `items` row.

The published formats carry fields ShapesWorld items do not have: answer types (VQAv2, VizWiz), question
structure (GQA), multiple-choice options (ScienceQA, A-OKVQA, MMMU, MMBench, BeyondVisQA) and context
hints (ScienceQA, MMBench). All of them follow from the question's family, which the `items` table does not
store; it is recovered from the wording, because every ShapesWorld question is one of `shapes.TEMPLATES`
filled in, and unanswerable items have no answer to guess the family from.

Options are drawn from the family's answer vocabulary (colours, shapes, counts, yes/no, invented names), so
a distractor is always an answer the same question could have had on another picture, as in the real sets.
Every draw is seeded by the item id: exporting the same items twice writes the same files.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from inbol_ray import schema as S
from inbol_ray.data.images import load_image_bytes
from inbol_ray.data.shapes_questions import FAMILY_CATEGORY, NAME_SYLLABLES, NUMBER_WORDS, TEMPLATES
from inbol_ray.data.shapes_scene import COLOURS, SHAPES

REFUSAL_OPTION = "Sorry, I can't help with it"
"""BeyondVisQA's refusal option, word for word (MM-SAP's examples), and the only refusal text the exporters
write: the graders count picking it as refusing because `refusal.is_refusal` detects it (a test checks)."""

HINTS = {
    "colour_of": "Each shape in the picture has exactly one colour.",
    "shape_of": "The shapes are circles, squares, triangles and diamonds.",
    "count": "Count only the objects of the colour the question names.",
    "left_of": "Left and right are as seen by the viewer.",
    "name_of": "Some colour-shape combinations have names of their own.",
    "exists": "The shapes are circles, squares, triangles and diamonds.",
}
"""ScienceQA `hint` / MMBench `hint` context per family: true of every picture, never the answer."""

# VQAv2 / VizWiz `answer_type` and GQA `types.structural` per family, in each publisher's vocabulary.
ANSWER_TYPE = {"colour_of": "other", "shape_of": "other", "count": "number", "left_of": "yes/no", "name_of": "other",
               "exists": "yes/no"}  # fmt: skip
GQA_STRUCTURAL = {"colour_of": "query", "shape_of": "query", "count": "query", "left_of": "verify", "name_of": "query",
                  "exists": "verify"}  # fmt: skip
GQA_SEMANTIC = {"colour_of": "attr", "shape_of": "attr", "count": "obj", "left_of": "rel", "name_of": "obj",
                "exists": "obj"}  # fmt: skip
MAX_COUNT = 6  # the most objects a scene holds (shapes_scene.OOD_STYLE): counts beyond it are no option


def _template_pattern(template: str) -> str:
    pattern = re.escape(template)
    for slot in ("colour2", "shape2", "colour", "shape"):
        pattern = pattern.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>[a-z]+)")
    return f"^{pattern}$"


_PATTERNS = [
    (family, re.compile(_template_pattern(text)))
    for family, sets in TEMPLATES.items()
    for texts in sets.values()
    for text in texts
]


def question_family(question: str) -> str:
    """The ShapesWorld family (`colour_of`, `count`, ...) whose template this question fills in."""
    for family, pattern in _PATTERNS:
        if pattern.match(question):
            return family
    raise ValueError(f"not a ShapesWorld question (no template matches): {question!r}")


@dataclass(frozen=True)
class Row:
    """One ShapesWorld item as the exporters see it: one gold answer (None when unanswerable)."""

    id: str
    dataset: str
    split: str
    question: str
    answer: str | None
    image: bytes
    family: str
    category: str


def rows_of(items: Sequence[dict[str, Any]]) -> list[Row]:
    out = []
    for item in items:
        answers = list(item[S.ANSWERS] or [])
        out.append(
            Row(
                id=item[S.ID],
                dataset=item[S.DATASET],
                split=item[S.SPLIT],
                question=item[S.QUESTION],
                answer=answers[0] if item[S.ANSWERABLE] and answers else None,
                image=load_image_bytes(item),
                family=question_family(item[S.QUESTION]),
                category=item[S.CATEGORY],
            )
        )
    return out


def name_pool(items: Sequence[dict[str, Any]]) -> list[str]:
    """Invented names to draw knowledge distractors from: every name the items answer with, padded with
    syllable pairs of the same make when a small export holds fewer than four."""
    names = sorted({a for it in items if it[S.CATEGORY] == FAMILY_CATEGORY["name_of"] for a in it[S.ANSWERS]})
    for a in NAME_SYLLABLES:
        for b in NAME_SYLLABLES:
            if len(names) >= 4:
                return names
            if a != b and a + b not in names:
                names.append(a + b)
    return names


def vocabulary(family: str, names: Sequence[str]) -> list[str]:
    """Every answer a question of this family can have: the options a distractor is drawn from."""
    return {
        "colour_of": list(COLOURS),
        "shape_of": list(SHAPES),
        "count": list(NUMBER_WORDS[: MAX_COUNT + 1]),
        "left_of": ["yes", "no"],
        "exists": ["yes", "no"],
        "name_of": list(names),
    }[family]


def rng_for(item_id: str, salt: str) -> np.random.Generator:
    """A generator fixed by the item and the use (crc32, not hash(): stable across processes)."""
    return np.random.default_rng(zlib.crc32(f"{salt}:{item_id}".encode()))


def multiple_choice(row: Row, names: Sequence[str], salt: str, max_options: int = 4) -> tuple[list[str], int]:
    """(options, index of the gold answer): the answer among up to max_options - 1 distractors, at a
    seeded position (the real sets do not keep the answer in one place)."""
    if row.answer is None:
        raise ValueError(f"{row.id}: an unanswerable item has no gold option")
    vocab = vocabulary(row.family, names)
    others = [v for v in vocab if v != row.answer]
    rng = rng_for(row.id, salt)
    n = min(max_options, len(vocab) if row.answer in vocab else len(vocab) + 1) - 1
    picked = [others[int(i)] for i in rng.choice(len(others), size=n, replace=False)]
    gold = int(rng.integers(n + 1))
    return picked[:gold] + [row.answer] + picked[gold:], gold


def refusal_choices(row: Row, names: Sequence[str], salt: str, n_answers: int = 4) -> list[str]:
    """BeyondVisQA-style options of an unanswerable question: up to `n_answers` plausible answers (five
    options in all, as BeyondVisQA has) with REFUSAL_OPTION at a seeded place. BeyondVisQA puts it
    anywhere from A to E; always last, a model could score refusals by picking the last letter."""
    vocab = vocabulary(row.family, names)
    rng = rng_for(row.id, salt)
    n = min(n_answers, len(vocab))
    answers = [vocab[int(i)] for i in rng.choice(len(vocab), size=n, replace=False)]
    at = int(rng.integers(n + 1))
    return answers[:at] + [REFUSAL_OPTION] + answers[at:]


def question_type(question: str) -> str:
    """VQAv2's `question_type`: the question's opening words, lower-cased (e.g. "what colour is")."""
    return " ".join(question.lower().rstrip("?.").split()[:3])


def token(item_id: str, length: int = 22) -> str:
    """A stable A-OKVQA-style question id (22 alphanumerics) for an item id."""
    alphabet = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    rng = rng_for(item_id, "token")
    return "".join(alphabet[int(i)] for i in rng.integers(len(alphabet), size=length))
