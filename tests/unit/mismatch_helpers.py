"""The mismatch tests' corpus and row helpers (tests/unit/test_mismatch.py, test_mismatch_pools.py).

The corpus has two data sets of 40 images each; every noun is mentioned on exactly one image, so every
referent is rare in both pools and every eligible question can be built: what a test sees is the recipe's
rules, not luck in the draws.
"""

from __future__ import annotations

from typing import Any

from inbol_ray.schema import (
    ANSWERABLE,
    ANSWERS,
    CATEGORY,
    CHOICES,
    DATASET,
    ID,
    IMAGE,
    IMAGE_PATH,
    METRIC,
    QUESTION,
    SOURCE,
    SPLIT,
)

NOUNS = ["bus", "kite", "horse", "laptop", "bench", "umbrella", "clock", "giraffe", "pizza", "surfboard"] * 4
ENTITIES = ["tower", "bridge", "castle", "temple", "stadium", "lighthouse", "palace", "windmill"] * 5


def item(
    rid: str, dataset: str, path: str | None, question: str, answers: list[str], **kw: Any
) -> dict[str, Any]:
    row = {ID: rid, DATASET: dataset, SPLIT: "train", IMAGE: None, IMAGE_PATH: path, QUESTION: question,
           ANSWERS: answers, CHOICES: None, METRIC: "vqa_soft", ANSWERABLE: True, CATEGORY: "other",
           SOURCE: f"{dataset}.json"}  # fmt: skip
    return {**row, **kw}


def corpus() -> list[dict[str, Any]]:
    """coco: 40 images, each with one eligible colour question and one yes/no question about its own noun
    (suffixed so every noun and colour answer is unique: an image mentioning a question's gold answer is
    never chosen, so a shared answer would shut the pool); wiki: 40 images with one eligible entity
    question each."""
    rows = []
    for i, noun in enumerate(NOUNS):
        noun = f"{noun}{i}"
        rows.append(
            item(f"coco:{i}a", "coco", f"coco/{i}.jpg", f"What color is the {noun}?", [f"red{i}"] * 10)
        )
        rows.append(item(f"coco:{i}b", "coco", f"coco/{i}.jpg", f"Is there a {noun}?", ["yes"] * 10))
    for i, thing in enumerate(ENTITIES):
        rows.append(item(f"wiki:{i}", "wiki", f"wiki/{i}.jpg", f"What is the name of this {thing}{i}?",
                         [f"Entity {i}"], metric="exact"))  # fmt: skip
    return rows


def by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r[ID]: r for r in rows}


def parts(row: dict[str, Any]) -> tuple[str, str]:
    """(question id, image row id) of a built row, from its id `mismatch:<question>@<image>`."""
    assert row[ID].startswith("mismatch:")
    question, image = row[ID][len("mismatch:") :].split("@")
    return question, image
