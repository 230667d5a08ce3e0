"""Unanswerable items (outside the extrinsic boundary): image-question mismatch, and model-written questions.

Mismatch pairs a question with another item's image when a rule says that image cannot answer it. The
rule is pluggable because only some data can *prove* it: ShapesWorld checks its scene graph
(inbol_ray.data.shapes supplies that rule); real data sets use `make_referent_rule`, a conservative
heuristic:
- the image must differ;
- the question must be open (not yes/no, not "how many": "no" and "0" answer those for any image);
- it must name something (content words left after dropping function and generic words), and none of
  those words may appear in anything asked or answered about the other image.
This does not prove absence (nobody may have asked about the umbrella in that image); it makes a wrong
pairing unlikely, and the rule is the place to tighten it (e.g. with detector labels) for a data set.

A question that finds no partner within `max_tries` draws is counted, not quarantined: the original item
is untouched, only an optional extra row was not made.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from inbol_ray import schema
from inbol_ray.boundary import as_frame, as_list

Row = Mapping[str, Any]
Rule = Callable[[Row, Row], bool]
"""(question_row, image_row) -> True when the image row's image provably cannot answer the question."""
QuestionGenerator = Callable[[pd.DataFrame], Sequence[str | None]]
"""Image rows -> one unanswerable question per row (None: none for that image), e.g. from an MLLM."""

_YES_NO_WORDS = "is are was were do does did can could will would should has have had am may might shall isn't aren't doesn't don't"
_STOP_WORDS = """a an the of in on at to for from with by about as into onto over under above below near behind between
    and or but not no nor so if than then that this these those there here it its it's they them their he him his
    she her we our you your i me my what which who whom whose when where why how whats what's is are was were be
    been being do does did doing done have has had can could will would should may might must shall many much
    more most some any all each every other another such same own very too just also only kind type sort color
    colour colors colours number name called image picture photo photograph shown seen visible see look looks
    like thing things one ones side left right front back top bottom middle center centre made make makes part
    way use used using year time day doing going"""
_YES_NO_OPENERS = frozenset(_YES_NO_WORDS.split())
_STOPWORDS = frozenset(_STOP_WORDS.split())
"""Function words, question words and words generic to any image: none of them names a referent."""


def image_key(row: Row) -> str:
    """Identity of a row's image: its path, or a digest of its bytes (ids differ across questions)."""
    path = row.get(schema.IMAGE_PATH)
    if isinstance(path, str) and path:
        return path
    data = row.get(schema.IMAGE)
    if data is None:
        return f"<no image:{row.get(schema.ID)}>"
    return hashlib.blake2b(bytes(data), digest_size=16).hexdigest()


def _content_words(text: str) -> set[str]:
    words = re.findall(r"[a-z]+", text.lower())
    out = set()
    for word in words:
        if word in _STOPWORDS or len(word) < 3:
            continue
        if word.endswith("ies") and len(word) > 4:
            word = word[:-3] + "y"
        elif word.endswith("s") and not word.endswith("ss") and len(word) > 3:
            word = word[:-1]
        out.add(word)
    return out


def referent_words(question: str) -> frozenset[str]:
    """What a question is about: its content words, crudely singularised ("umbrellas" -> "umbrella")."""
    return frozenset(_content_words(question))


def is_open_question(question: str) -> bool:
    """Yes/no and counting questions have an answer for every image, so they can never be unanswerable."""
    words = question.lower().split()
    return bool(words) and words[0] not in _YES_NO_OPENERS and "how many" not in question.lower()


def _row_words(row: Row) -> set[str]:
    words = _content_words(str(row.get(schema.QUESTION, "")))
    for answer in as_list(row.get(schema.ANSWERS)):
        words |= _content_words(str(answer))
    return words


def make_referent_rule(items: pd.DataFrame | pa.Table) -> Rule:
    """The default real-data rule, knowing every word asked or answered about each image in `items`."""
    vocabulary: dict[str, set[str]] = {}
    for row in as_frame(items).to_dict("records"):
        vocabulary.setdefault(image_key(row), set()).update(_row_words(row))

    def rule(question_row: Row, image_row: Row) -> bool:
        key = image_key(image_row)
        if key == image_key(question_row):
            return False
        question = str(question_row[schema.QUESTION])
        referents = referent_words(question)
        if not is_open_question(question) or not referents:
            return False
        known = vocabulary.get(key, set()) | _row_words(image_row)
        return referents.isdisjoint(known)

    return rule


def _unanswerable_row(
    base: Row, image_row: Row, question: str, item_id: str, category: str, source: str
) -> dict:
    return {
        schema.ID: item_id,
        schema.DATASET: base[schema.DATASET],
        schema.SPLIT: base[schema.SPLIT],
        schema.IMAGE: image_row.get(schema.IMAGE),
        schema.IMAGE_PATH: image_row.get(schema.IMAGE_PATH),
        schema.QUESTION: question,
        schema.ANSWERS: [],
        schema.CHOICES: None,
        schema.METRIC: base[schema.METRIC],
        schema.ANSWERABLE: False,
        schema.CATEGORY: category,
        schema.SOURCE: source,
    }


def build_mismatch_items(
    items: pd.DataFrame | pa.Table,
    n: int,
    is_unanswerable: Rule,
    *,
    seed: int,
    max_tries: int = 20,
    category: str = "unanswerable_mismatch",
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Up to `n` new unanswerable items: an answerable open question on another item's image.

    Questions come from answerable items without options (a multiple-choice question moved to another
    image keeps options that may still fit it). Each tries up to `max_tries` random images; the rule
    decides. Deterministic given `seed`. Returns rows in the `items` layout and counts.
    """
    frame = as_frame(items)
    rows = frame.to_dict("records")
    eligible = [r for r in rows if r[schema.ANSWERABLE] and not as_list(r.get(schema.CHOICES))]
    counts: Counter[str] = Counter(requested=n, eligible=len(eligible), ineligible=len(rows) - len(eligible))
    rng = np.random.default_rng(seed)
    built: list[dict] = []
    for index in rng.permutation(len(eligible)):
        if len(built) >= n:
            break
        question_row = eligible[index]
        counts["tried"] += 1
        for _ in range(max_tries):
            image_row = rows[int(rng.integers(len(rows)))]
            if image_key(image_row) == image_key(question_row):
                counts["same_image_draws"] += 1
                continue
            if is_unanswerable(question_row, image_row):
                q_id, i_id = str(question_row[schema.ID]), str(image_row[schema.ID])
                source = f"mismatch:{q_id}+{i_id}"
                built.append(
                    _unanswerable_row(
                        question_row,
                        image_row,
                        str(question_row[schema.QUESTION]),
                        f"{q_id}~on~{i_id}",
                        category,
                        source,
                    )
                )
                break
            counts["rule_rejections"] += 1
        else:
            counts["unpaired"] += 1
    counts["built"] = len(built)
    return pd.DataFrame(built, columns=schema.ITEMS.names), dict(counts)


def build_generated_unanswerable(
    image_rows: pd.DataFrame | pa.Table,
    generate: QuestionGenerator,
    *,
    check: Callable[[Row], bool] | None = None,
    category: str = "unanswerable_generated",
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Hook for model-written unanswerable questions: `generate` writes one question per image row.

    `check(new_row)` may veto a question (e.g. ShapesWorld's scene graph, or a referent check); without a
    proof, generated questions are only as unanswerable as the generator is reliable, so prefer a check.
    """
    frame = as_frame(image_rows)
    rows = frame.to_dict("records")
    questions = list(generate(frame))
    if len(questions) != len(rows):
        raise ValueError(f"generator returned {len(questions)} questions for {len(rows)} image rows")
    counts: Counter[str] = Counter(input=len(rows))
    built: list[dict] = []
    for row, question in zip(rows, questions, strict=True):
        if not question or not str(question).strip():
            counts["none_returned"] += 1
            continue
        text = str(question).strip()
        digest = hashlib.blake2b(text.encode(), digest_size=4).hexdigest()
        item_id = f"{row[schema.ID]}~gen~{digest}"
        new_row = _unanswerable_row(row, row, text, item_id, category, f"generated:{row[schema.ID]}")
        if check is not None and not check(new_row):
            counts["rejected_by_check"] += 1
            continue
        built.append(new_row)
    counts["built"] = len(built)
    return pd.DataFrame(built, columns=schema.ITEMS.names), dict(counts)
