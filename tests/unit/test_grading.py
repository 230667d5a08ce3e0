"""Grading: the official VQA normalisation and accuracy, exact match, multiple-choice letters."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inbol_ray import schema
from inbol_ray.grading import (
    choice_index,
    grade,
    is_refusal_response,
    normalize_answer,
    process_punctuation,
    vqa_accuracy,
)

# --- a verbatim port of the official evaluation loop, used as the oracle ---------------------------
# GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py (processPunctuation,
# processDigitArticle and the accuracy loop of evaluate()); only the contraction table is abridged to
# the entries the strategies below can produce.

_OFFICIAL_PUNCT = [
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_OFFICIAL_MANUAL = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_OFFICIAL_CONTRACTIONS = {
    "dont": "don't",
    "isnt": "isn't",
    "cant": "can't",
    "oclock": "o'clock",
    "whats": "what's",
}
_OFFICIAL_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_OFFICIAL_COMMA = re.compile(r"(\d)(\,)(\d)")


def _official_punct(in_text: str) -> str:
    out_text = in_text
    for p in _OFFICIAL_PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(_OFFICIAL_COMMA, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return _OFFICIAL_PERIOD.sub("", out_text, re.UNICODE)


def _official_digit_article(in_text: str) -> str:
    out_text = []
    for word in in_text.lower().split():
        word = _OFFICIAL_MANUAL.setdefault(word, word)
        if word not in ["a", "an", "the"]:
            out_text.append(word)
    for i, word in enumerate(out_text):
        if word in _OFFICIAL_CONTRACTIONS:
            out_text[i] = _OFFICIAL_CONTRACTIONS[word]
    return " ".join(out_text)


def _official_accuracy(res_ans: str, gt_answers: list[str]) -> float:
    res_ans = res_ans.replace("\n", " ").replace("\t", " ").strip()
    res_ans = _official_digit_article(_official_punct(res_ans))
    gts = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(gt_answers)]
    if len(set(gt_answers)) > 1:
        for ans in gts:
            ans["answer"] = _official_punct(ans["answer"])
    gt_acc = []
    for datum in gts:
        others = [item for item in gts if item != datum]
        matching = [item for item in others if item["answer"] == res_ans]
        gt_acc.append(min(1, float(len(matching)) / 3))
    return float(sum(gt_acc)) / len(gt_acc)


# --- normalisation: the documented cases (visualqa.org/evaluation.html) ------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes", "yes"),  # lower case
        ("RED", "red"),
        ("dog.", "dog"),  # periods removed ...
        ("3.5", "3.5"),  # ... except as a decimal point
        ("5.", "5"),
        ("two", "2"),  # number words -> digits
        ("Ten", "10"),
        ("none", "0"),  # the official map includes none -> 0
        ("a dog", "dog"),  # articles removed
        ("The Red Bus", "red bus"),
        ("an apple", "apple"),
        ("dont", "don't"),  # missing apostrophe added
        ("isnt", "isn't"),
        ("black-and-white", "black and white"),  # punctuation -> space
        ("t-shirt", "t shirt"),
        ("girl's", "girl's"),  # apostrophe kept
        ("2:50 pm", "2:50 pm"),  # colon kept
        ("100,978", "100978"),  # comma between digits removed, no space
        ("Yes, it is!", "yes it is"),  # a mark touching a space is deleted, not spaced
        ("  two\tdogs\n", "2 dogs"),
        ("hello?!", "hello  ".strip()),
    ],
)
def test_normalize_answer_documented_cases(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_comma_between_digits_deletes_every_mark_like_the_official_script() -> None:
    # The official condition is global: one digit,digit comma makes every mark vanish without a space.
    assert process_punctuation("1,000-2,000") == "10002000"
    assert process_punctuation("red-blue") == "red blue"


@pytest.mark.parametrize(
    ("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_vqa_accuracy_levels_for_ten_annotators(matches: int, expected: float) -> None:
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("Cat.", answers) == pytest.approx(expected)


def test_vqa_accuracy_other_lengths_use_min_matches_over_three() -> None:
    assert vqa_accuracy("cat", ["cat", "dog", "cat"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("cat", ["cat"] * 5) == 1.0
    assert vqa_accuracy("cat", ["cat"]) == pytest.approx(1 / 3)  # why single-answer sets should use `exact`
    assert vqa_accuracy("cat", []) == 0.0


def test_gold_answers_are_normalised_too() -> None:
    # Unanimous raw gold "Two" would never match under the official script; here it does.
    assert vqa_accuracy("2", ["Two"] * 10) == 1.0


_GOLD_VOCAB = ["2", "yes", "no", "red", "black and white", "girl's", "10:30", "3.5", "tennis", "don't", "0"]
_RESPONSES = ["Two.", "2", "Yes!", "yes", "No.", "The red", "red", "black-and-white", "Girl's", "10:30",
              "3.5", "Tennis.", "dont", "none", "zero", "blue", "a tennis", "Black and White."]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    response=st.sampled_from(_RESPONSES),
    answers=st.lists(st.sampled_from(_GOLD_VOCAB), min_size=10, max_size=10),
)
def test_vqa_accuracy_equals_the_official_loop_on_pre_normalised_gold(
    response: str, answers: list[str]
) -> None:
    assert vqa_accuracy(response, answers) == pytest.approx(_official_accuracy(response, answers))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abc AB.,-'?!:0123456789", max_size=20))
def test_normalisation_is_idempotent(text: str) -> None:
    once = normalize_answer(text)
    assert normalize_answer(once) == once


# --- grade ----------------------------------------------------------------------------------------


def test_vqa_soft_threshold_is_configurable() -> None:
    answers = ["cat"] * 2 + ["dog"] * 8  # "cat" scores 0.6
    assert grade("cat", answers, "vqa_soft")
    assert not grade("cat", answers, "vqa_soft", correct_at=0.9)


def test_refusal_is_never_correct_even_when_the_gold_says_unanswerable() -> None:
    assert not grade("unanswerable", ["unanswerable"] * 10, "vqa_soft")
    assert not grade("I don't know", ["I don't know"], "exact")


def test_exact_match_uses_vqa_normalisation_and_any_gold() -> None:
    assert grade("The Circle.", ["square", "circle"], "exact")
    assert grade("two", ["2"], "exact")
    assert not grade("red circle", ["circle"], "exact")
    assert not grade("", [""], "exact")  # an empty response never matches


@pytest.mark.parametrize(
    "response",
    ["B", "B.", "(B)", "b", "[B]", "B) dog", "B. dog", "The answer is B", "The answer is (B).", "Answer: b",
     "Option B", "dog", "Dog.", "A dog", "The answer is dog.", "I think B is right."],
)  # fmt: skip
def test_mc_letter_accepts_common_forms(response: str) -> None:
    choices = ["cat", "dog", "bird"]
    assert grade(response, ["B"], "mc_letter", choices), response


@pytest.mark.parametrize(
    "response", ["A", "C", "the answer is a dog.", "A. cat", "The answer is cat", "D", "Z", ""]
)
def test_mc_letter_rejects_other_or_invalid_choices(response: str) -> None:
    choices = ["cat", "dog", "bird"]
    expected_dog = response == "the answer is a dog."  # lower-case "a" before a word is an article
    assert grade(response, ["B"], "mc_letter", choices) is expected_dog


def test_mc_gold_may_be_option_text_and_letters_beyond_options_never_count() -> None:
    assert grade("C", ["bird"], "mc_letter", ["cat", "dog", "bird"])
    assert choice_index("E", ["x", "y"]) is None
    assert choice_index("It is dark red", ["red", "dark red"]) == 1  # the longest option text wins
    assert choice_index("either cat or dog", ["cat", "dog"]) is None  # equally long: no choice


def test_picking_a_refusal_option_is_a_refusal_where_the_set_offers_one() -> None:
    choices = ["a cat", "a dog", "a bird", "a fish", "Sorry, I can't help with it"]
    assert is_refusal_response("E", choices, refusal_option=True)
    assert is_refusal_response("Sorry, I can't help with it", choices, refusal_option=True)
    assert not is_refusal_response("B", choices, refusal_option=True)


@pytest.mark.parametrize(
    "option", ["Cannot be determined", "Not enough information", "Sorry, I can't help with it"]
)
def test_a_refusal_like_option_is_an_answer_on_answerable_sets(option: str) -> None:
    """MMBench / ScienceQA / MMMU items whose correct option reads like a refusal score +1 when picked."""
    choices = ["3", "4", option]
    for response in ("C", "(C)", option):
        assert not is_refusal_response(response, choices, refusal_option=False), response
        assert grade(response, ["C"], "mc_letter", choices), response
    assert not grade("C", ["A"], "mc_letter", choices)  # and -1 when wrong, not a refusal
    assert is_refusal_response("I don't know.", choices, refusal_option=False)  # free text still refuses


COUNT_CHOICES = ["3", "There are no dogs in the image", "5"]


def test_the_question_reaches_the_refusal_detector() -> None:
    absent, counting = "There are no dogs in the image.", "How many dogs are there?"
    assert is_refusal_response(absent, refusal_option=False)
    assert is_refusal_response(absent, refusal_option=False, question="What color is the dog?")
    assert not is_refusal_response(absent, refusal_option=False, question=counting)
    # the option picked is read against the question too
    assert is_refusal_response("B", COUNT_CHOICES, refusal_option=True)
    assert not is_refusal_response("B", COUNT_CHOICES, refusal_option=True, question=counting)
    # on an answerable item the option is an answer either way
    assert grade("B", ["B"], "mc_letter", COUNT_CHOICES)
    assert grade("B", ["B"], "mc_letter", COUNT_CHOICES, question=counting)


def test_both_grading_call_sites_pass_the_items_question() -> None:
    from inbol_ray.boundary import grade_samples_batch
    from inbol_ray.config import GradingConfig
    from inbol_ray.generation.grade import grade_predictions

    absent = "There are no dogs in the image."
    batch = pd.DataFrame(
        {
            schema.ID: ["count", "color"],
            schema.DATASET: ["d", "d"],
            schema.QUESTION: ["How many dogs are there?", "What color is the dog?"],
            schema.RESPONSES: [[absent], [absent]],
            schema.ANSWERS: [["0"], ["brown"]],
            schema.CHOICES: [None, None],
            schema.METRIC: ["exact", "exact"],
            schema.ANSWERABLE: [True, True],
        }
    )
    samples = grade_samples_batch(batch, GradingConfig())
    assert samples[schema.REFUSED].tolist() == [[False], [True]]
    predictions = grade_predictions(batch, "base", 0.5)
    assert predictions[schema.REFUSED].tolist() == [False, True]
    # callers without a question column keep the question-free reading
    no_question = batch.drop(columns=[schema.QUESTION])
    assert grade_samples_batch(no_question, GradingConfig())[schema.REFUSED].tolist() == [[True], [True]]
    assert grade_predictions(no_question, "base", 0.5)[schema.REFUSED].tolist() == [True, True]


def test_unknown_metric_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        grade("x", ["x"], "bleu")


def test_every_schema_metric_has_a_grader() -> None:
    for metric in schema.METRICS:
        grade("x", ["x"], metric, ["x", "y"])  # no ValueError
