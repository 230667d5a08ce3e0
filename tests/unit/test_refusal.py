"""Refusal templates and the refusal detector, measured on a labelled list of real-style phrasings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inbol_ray.refusal import (
    REFUSAL_DETECTOR_VERSION,
    REFUSAL_TEMPLATES,
    REFUSAL_TEMPLATES_VERSION,
    is_refusal,
    refusal_target,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "refusal_phrasings.tsv"


def _labelled() -> list[tuple[bool, str, str | None]]:
    """(is a refusal, response, question or None): the question column is optional."""
    rows = []
    for line in FIXTURE.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        label, text, *rest = line.split("\t")
        assert label in ("refusal", "answer") and len(rest) <= 1, line
        rows.append((label == "refusal", text, rest[0] if rest else None))
    return rows


def test_detector_precision_and_recall_on_the_labelled_list() -> None:
    rows = _labelled()
    n_refusal = sum(y for y, _, _ in rows)
    assert len(rows) >= 400 and n_refusal >= 180 and len(rows) - n_refusal >= 180
    assert sum(q is not None for _, _, q in rows) >= 30
    predicted = [(y, is_refusal(text, question=q), (text, q) if q else text) for y, text, q in rows]
    tp = sum(y and p for y, p, _ in predicted)
    fp = [t for y, p, t in predicted if p and not y]
    fn = [t for y, p, t in predicted if y and not p]
    precision, recall = tp / (tp + len(fp)), tp / (tp + len(fn))
    print(f"\nrefusal detector on {len(rows)} phrasings: precision {precision:.3f}, recall {recall:.3f}")
    print(f"  false positives: {fp}\n  false negatives: {fn}")
    # Issue 14's bar. The list holds a few deliberately hard cases the detector is known to miss (see the
    # fixture); the bounds catch regressions without pretending it is perfect.
    assert precision >= 0.97, fp
    assert recall >= 0.97, fn


@pytest.mark.parametrize(
    "text",
    ["No", "No.", "no", "none", "None.", "0", "nothing", "Nothing.", "nobody", "No one.", "Neither.", "Nope",
     "Probably a dog.", "It is not red, it is blue", "unknown soldier", "Maybe", "2", "Yes", ""],
)  # fmt: skip
def test_short_answers_are_never_refusals(text: str) -> None:
    assert not is_refusal(text)


@pytest.mark.parametrize("template", REFUSAL_TEMPLATES)
def test_every_template_and_its_truncation_is_detected(template: str) -> None:
    assert is_refusal(template)
    assert is_refusal(template.upper())
    words = template.split()
    assert is_refusal(" ".join(words[:3])), "a template cut by max_new_tokens is still a refusal"


def test_curly_apostrophes_and_case_do_not_matter() -> None:
    assert is_refusal("I DON\u2019T KNOW")
    assert is_refusal("I can\u2019t tell.")


def test_hedge_with_a_guess_is_an_answer_but_hedge_alone_is_a_refusal() -> None:
    assert is_refusal("I'm not sure.")
    assert not is_refusal("I'm not sure, but it might be a cat.")
    assert is_refusal("I'm not sure, it could be anything.")


def test_absence_after_a_plain_yes_no_is_an_answer() -> None:
    assert is_refusal("There is no dog in the image.")
    assert not is_refusal("No, there is no dog in the image.")


# --- issue 14: the reviewer's held-out misses and false positives, and their variants ---------------

COUNTING = "How many dogs are there?"
ABOUT_THE_DOG = "What color is the dog?"
SHIRT = "Is the shirt too small or too big?"


@pytest.mark.parametrize(
    "text",
    [
        "I don't have enough information to answer.", "I do not have enough information", "There isn't enough information",
        "There is not enough info", "Not clear.", "It's not clear.", "Unclear.", "Sorry.", "Sorry!", "I'm sorry.",
        "I'm not 100% sure.", "I'm not completely sure", "Not sure.", "I can't be 100% sure.",
    ],
)  # fmt: skip
@pytest.mark.parametrize("question", [None, ABOUT_THE_DOG, COUNTING])
def test_former_misses_are_refusals_whatever_the_question(text: str, question: str | None) -> None:
    assert is_refusal(text, question=question)


@pytest.mark.parametrize("text", ["too small", "Too small.", "It is too small", "The shirt is too small."])
@pytest.mark.parametrize("question", [None, SHIRT])
def test_too_small_alone_describes_the_object(text: str, question: str | None) -> None:
    assert not is_refusal(text, question=question)


@pytest.mark.parametrize("text", ["The text is too small to read", "the image is too small to tell"])
@pytest.mark.parametrize("question", [None, SHIRT, "What does the sign say?"])
def test_too_small_to_see_is_a_refusal(text: str, question: str | None) -> None:
    assert is_refusal(text, question=question)


def test_too_small_with_a_text_subject_is_a_refusal_unless_the_size_was_asked() -> None:
    assert is_refusal("The numbers are too small.")
    assert is_refusal("The numbers are too small.", question="What does the sign say?")
    assert not is_refusal("The print is too small.", question="Is the print too small or too big?")


@pytest.mark.parametrize(
    "text",
    [
        "There are no dogs in the image.", "There are no dogs in the picture", "I don't see any dogs.",
        "I can't see any dogs in the image.", "There aren't any dogs in the photo.",
        "The image does not show any dogs.", "None.", "none", "0",
    ],
)  # fmt: skip
def test_absence_answers_a_counting_question(text: str) -> None:
    for question in (
        COUNTING,
        "how many dogs are in the image?",
        "What is the number of dogs?",
        "Count the dogs.",
    ):
        assert not is_refusal(text, question=question), question


@pytest.mark.parametrize(
    "text", ["There are no dogs in the image.", "I don't see any dogs.", "The image does not show any dogs."]
)
def test_absence_refuses_a_question_about_the_absent_thing(text: str) -> None:
    assert is_refusal(text, question=ABOUT_THE_DOG)
    assert is_refusal(text), "without the question, absence keeps today's reading: a refusal"


def test_absence_answers_an_existence_question() -> None:
    assert not is_refusal("There is no dog in the image.", question="Is there a dog in the image?")
    assert not is_refusal("I don't see any cats.", question="Are there any cats?")


def test_a_counting_question_does_not_excuse_a_refusal() -> None:
    assert is_refusal("I cannot see the image.", question=COUNTING)
    assert is_refusal("I can't see any dogs, the image is too dark.", question=COUNTING)
    assert is_refusal("Not sure.", question=COUNTING)
    assert is_refusal("There is no way to tell how many.", question=COUNTING)
    assert is_refusal("I can't see any details.", question=COUNTING)
    assert is_refusal("There are no dogs in the image, so I cannot tell.", question=ABOUT_THE_DOG)


def test_echoing_the_asked_property_answers_a_yes_no_question() -> None:
    assert not is_refusal("Not clear.", question="Is the water clear?")
    assert not is_refusal("Not visible.", question="Is the moon visible?")
    assert is_refusal("Not visible.", question="What is on the table?")
    # a perception verb still says the model cannot see, whatever was asked
    assert is_refusal("It's too dark to see.", question="Is the room dark?")


def test_quoted_text_is_the_image_not_the_model() -> None:
    assert not is_refusal('A sign that says "I don\'t know".')
    assert is_refusal('"I don\'t know"')


def test_hedges_that_still_commit_are_answers() -> None:
    assert not is_refusal("I can't say for sure, but it's probably a cat.")
    assert not is_refusal("I'm not 100% sure, but I think it's a Honda.")
    assert not is_refusal("I can't tell exactly, but about 20.")
    assert is_refusal("I can't say for sure.")


def test_detector_version_is_declared() -> None:
    assert REFUSAL_DETECTOR_VERSION == "v2"


def test_refusal_target_picks_or_rotates_deterministically() -> None:
    assert REFUSAL_TEMPLATES[0] == "I don't know."
    assert "Sorry, I cannot answer this question based on the image." in REFUSAL_TEMPLATES
    assert isinstance(REFUSAL_TEMPLATES, tuple) and REFUSAL_TEMPLATES_VERSION
    assert refusal_target("q1", 1) == REFUSAL_TEMPLATES[1]
    # The rotation is a keyed digest of the id, identical in every process (builtin hash() is salted).
    digest = hashlib.blake2b(b"item-42", digest_size=8).digest()
    assert (
        refusal_target("item-42", -1)
        == REFUSAL_TEMPLATES[int.from_bytes(digest, "big") % len(REFUSAL_TEMPLATES)]
    )
    used = {refusal_target(f"item-{i}", -1) for i in range(200)}
    assert used == set(REFUSAL_TEMPLATES)


@pytest.mark.parametrize("index", [-2, len(REFUSAL_TEMPLATES)])
def test_refusal_target_rejects_bad_indices(index: int) -> None:
    with pytest.raises(ValueError):
        refusal_target("x", index)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(10**6), max_value=10**6), st.sampled_from(["", ".", " dogs", " people."]))
def test_counts_are_never_refusals(number: int, suffix: str) -> None:
    assert not is_refusal(f"{number}{suffix}")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_detector_is_total(text: str) -> None:
    assert is_refusal(text) in (True, False)
