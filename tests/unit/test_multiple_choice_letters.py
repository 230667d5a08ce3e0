"""Multiple-choice items keep their gold letter whatever it is: "A" included (issue 30).

The VQA article rule turns "A" into "" (`grading.normalize_answer`), so votes on normalised text lost every
gold-"A" item's answer (quarantined from IDK-IT and CA-DPO while its refusal targets stayed) and never chose
a frequent wrong "A". These tests walk a letter through grading, confidence, construction and the mismatch
recipe's eligibility, for every gold letter.
"""

from __future__ import annotations

import pandas as pd
import pytest

from inbol_ray import schema
from inbol_ray.boundary import grade_samples_batch
from inbol_ray.boundary.construct import build_cadpo_pairs, build_idk_it, most_frequent_option
from inbol_ray.config import ConstructConfig, GradingConfig
from inbol_ray.data.referents import exclusion_reason
from inbol_ray.grading import answer_key, grade, normalize_answer

CHOICES = ["cat", "dog", "bird", "fish"]
LETTERS = "ABCD"


def _item(gold: str, responses: list[str], item_id: str = "q") -> dict:
    return {
        schema.ID: item_id,
        schema.DATASET: "scienceqa",
        schema.SPLIT: "train",
        schema.IMAGE: b"png",
        schema.IMAGE_PATH: None,
        schema.QUESTION: "Which animal is shown?",
        schema.PROMPT: "Which animal is shown?\nA. cat\nB. dog\nC. bird\nD. fish\nAnswer with the letter.",
        schema.ANSWERS: [gold],
        schema.CHOICES: CHOICES,
        schema.METRIC: "mc_letter",
        schema.ANSWERABLE: True,
        schema.CATEGORY: "natural science",
        schema.SOURCE: "problems.json",
        schema.RESPONSES: responses,
    }


def _graded(items: list[dict]) -> pd.DataFrame:
    """Items joined with their graded samples, as construct receives them."""
    frame = pd.DataFrame(items)
    samples = grade_samples_batch(frame, GradingConfig())
    cols = [
        c for c in samples.columns if c not in (schema.ID, schema.RESPONSES, schema.PROMPT, schema.DATASET)
    ]
    return frame.join(samples.set_index(schema.ID)[cols], on=schema.ID)


def test_the_article_rule_erases_a_but_the_answer_key_keeps_it() -> None:
    assert normalize_answer("A") == ""  # the official VQA processing, kept for vqa_soft
    assert answer_key("A") == "a" and answer_key("A.") == "a" and answer_key("the") == "the"
    assert answer_key("The Red ball") == normalize_answer("The Red ball") == "red ball"
    assert grade("a", ["A"], "exact") and not grade("b", ["A"], "exact")


@pytest.mark.parametrize("gold", list(LETTERS))
def test_every_gold_letter_grades_and_becomes_the_target(gold: str) -> None:
    wrong = next(letter for letter in LETTERS if letter != gold)
    for response in (gold, f"({gold})", f"{gold}.", CHOICES[LETTERS.index(gold)]):
        assert grade(response, [gold], "mc_letter", CHOICES), response
    assert not grade(wrong, [gold], "mc_letter", CHOICES)

    known = _item(gold, [gold] * 10, "known")
    mixed = _item(gold, [gold] * 4 + [wrong] * 6, "mixed")
    frame = _graded([known, mixed])
    assert frame[schema.CONF].tolist() == [1.0, 0.4]

    idk = build_idk_it(frame, ConstructConfig(tau_idk=0.3))
    assert idk.counts["quarantined"] == 0
    assert idk.table[schema.TARGET].tolist() == [gold, gold]
    assert idk.table[schema.TARGET_KIND].tolist() == ["answer", "answer"]

    pairs = build_cadpo_pairs(frame, ConstructConfig())
    assert pairs.counts["quarantined"] == 0
    by_id = pairs.table.set_index(schema.ID)
    assert by_id.loc["known", schema.RESP_CORRECT] == gold
    assert by_id.loc["mixed", schema.RESP_CORRECT] == gold
    assert by_id.loc["mixed", schema.RESP_INCORRECT] == wrong


def test_a_frequent_wrong_a_is_the_incorrect_response() -> None:
    # gold C; the model says "A" six times, "D" twice, "C" twice: the hallucination to push down is A
    frame = _graded([_item("C", ["A"] * 6 + ["D"] * 2 + ["C"] * 2)])
    pairs = build_cadpo_pairs(frame, ConstructConfig())
    assert pairs.counts.get("fallback_incorrect_from_wrong_option", 0) == 0
    assert pairs.table[schema.RESP_INCORRECT].tolist() == ["A"]
    assert pairs.table[schema.RESP_CORRECT].tolist() == ["C"]


def test_votes_are_on_the_option_a_response_picks() -> None:
    # "dog", "B" and "(B)" are one vote for option B; a text picking no option does not vote
    assert most_frequent_option(["A", "dog", "B", "(B)", "no idea"], CHOICES) == 1
    assert most_frequent_option(["a", "A."], CHOICES) == 0
    assert most_frequent_option(["no idea"], CHOICES) is None
    # the gold may be the option's text: the target is still its letter
    frame = _graded([_item("fish", ["D"] * 10)])
    assert build_idk_it(frame, ConstructConfig()).table[schema.TARGET].tolist() == ["D"]


@pytest.mark.parametrize("gold", list(LETTERS))
def test_multiple_choice_items_never_become_mismatched_questions(gold: str) -> None:
    row = _item(gold, [])
    assert exclusion_reason(row) == "multiple choice"
    open_row = {**row, schema.CHOICES: None, schema.METRIC: "exact", schema.ANSWERS: ["a"],
                schema.QUESTION: "What letter is on the red sign?"}  # fmt: skip
    assert exclusion_reason(open_row) is None
