"""Refusal templates and the refusal detector, measured on a labelled list of real-style phrasings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inbol_ray.refusal import REFUSAL_TEMPLATES, REFUSAL_TEMPLATES_VERSION, is_refusal, refusal_target

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "refusal_phrasings.tsv"


def _labelled() -> list[tuple[bool, str]]:
    rows = []
    for line in FIXTURE.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        label, text = line.split("\t", 1)
        assert label in ("refusal", "answer"), line
        rows.append((label == "refusal", text))
    return rows


def test_detector_precision_and_recall_on_the_labelled_list() -> None:
    rows = _labelled()
    n_refusal = sum(y for y, _ in rows)
    assert len(rows) >= 150 and n_refusal >= 60 and len(rows) - n_refusal >= 60
    predicted = [(y, is_refusal(text), text) for y, text in rows]
    tp = sum(y and p for y, p, _ in predicted)
    fp = [t for y, p, t in predicted if p and not y]
    fn = [t for y, p, t in predicted if y and not p]
    precision, recall = tp / (tp + len(fp)), tp / (tp + len(fn))
    print(f"\nrefusal detector on {len(rows)} phrasings: precision {precision:.3f}, recall {recall:.3f}")
    print(f"  false positives: {fp}\n  false negatives: {fn}")
    # The list holds a few deliberately hard cases the detector is known to miss (see the fixture's
    # tail); these bounds catch regressions without pretending it is perfect.
    assert precision >= 0.98, fp
    assert recall >= 0.95, fn


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
