"""BeyondVisQA end to end: its JSONL through the `unanswerable_jsonl` loader, greedy answers graded into
`predictions` rows, and the refusal option the ShapesWorld exporter writes.

BeyondVisQA (MM-SAP, github.com/YHWmz/MM-SAP) asks questions the image cannot answer, with five options
one of which is "Sorry, I can't help with it", placed at any letter (A-E). Choosing it is a refusal, so
a response "E" must count as refused although a bare letter looks like an answer; choosing any other
option is a hallucinated answer: neither refused nor (on an unanswerable item) correct. The questions and
options below are the published examples.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inbol_ray import schema as S
from inbol_ray.config import DatasetSpec
from inbol_ray.data.export.questions import REFUSAL_OPTION, Row, refusal_choices, vocabulary
from inbol_ray.data.loaders import items_table, load
from inbol_ray.data.shapes_questions import TEMPLATES
from inbol_ray.generation.grade import grade_predictions
from inbol_ray.grading import is_refusal_response
from inbol_ray.refusal import is_refusal

LETTERS = "ABCDE"
SORRY = "Sorry, I can't help with it"

# (id, question, options, category): the MM-SAP README's BeyondVisQA examples, refusal at every letter.
EXAMPLES = [
    ("collar", "What color is the cat's collar on the bed?", [SORRY, "Black", "Yellow", "Green", "Brown"],
     "nonexistent_objects"),
    ("bathtub", "How many milliliters of water can the bathtub hold?",
     ["150 liters", SORRY, "250 liters", "200 liters", "300 liters"], "intractable_quantity"),
    ("cat", "What is the name of the cat in the image?", ["Oliver", "Whiskers", SORRY, "Mittens", "Leo"],
     "background_information"),
    ("truck", "How long has the truck been parked in this spot?",
     ["Less than a week", "A few months", "Several years", SORRY, "It's in motion right now"],
     "temporal_unpredictability"),
    ("book", "What is the title of the book lying on the bed?",
     ["The Great Gatsby", "1984", "To Kill a Mockingbird", "little Prince", SORRY], "missing_visual_information"),
]  # fmt: skip

# Wordings a re-packaged BeyondVisQA (or a similar benchmark) may use for the refusal option.
REFUSAL_WORDINGS = [
    SORRY,
    "Sorry, I can't help with it.",
    "Sorry, I cannot help with it.",
    "Sorry, I can not help with it",
    "sorry, i can\u2019t help with it",  # typographic apostrophe
    "I can't help with it",
    "I don't know",
    "Unanswerable",
    "Cannot be determined from the image",
    "Not enough information to answer",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    (path.parent / "img.png").write_bytes(b"")  # never opened: loaders only parse text
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load_examples(tmp_path: Path, examples=EXAMPLES, answers: bool = False):
    rows = [
        {"id": key, "image": "img.png", "question": q, "choices": options, "category": category}
        | ({"answers": [LETTERS[options.index(SORRY)]]} if answers else {})
        for key, q, options, category in examples
    ]
    spec = DatasetSpec(
        name="beyondvisqa",
        format="unanswerable_jsonl",
        path=str(write_jsonl(tmp_path / "beyondvisqa.jsonl", rows)),
        split="unanswerable_test",
    )
    parsed = load(spec)
    assert parsed.quarantine == []
    return items_table(parsed.items)


def predictions(items, responses: list[str]):
    """The evaluate stage's grading of one greedy response per item (rows in `items` order)."""
    batch = items.append_column(S.RESPONSES, [[[r] for r in responses]])
    return grade_predictions(batch, "base", 0.5)


@pytest.mark.parametrize("gold", [False, True], ids=["no_answers", "refusal_letter_as_gold"])
def test_choosing_the_refusal_option_is_a_refusal_and_any_other_option_is_not(tmp_path: Path, gold) -> None:
    """Some conversions store the refusal letter as the gold answer: it still scores as a refusal (0),
    never as correct (+1), or the refusal rate and s_trust would count the same response twice."""
    items = load_examples(tmp_path, answers=gold)
    rows = items.to_pylist()
    assert all(r[S.METRIC] == "mc_letter" and r[S.ANSWERABLE] is False for r in rows)
    assert [r[S.CHOICES].index(SORRY) for r in rows] == [0, 1, 2, 3, 4]

    refusing = [LETTERS[r[S.CHOICES].index(SORRY)] for r in rows]  # "A", "B", ... "E"
    got = predictions(items, refusing)
    assert got[S.REFUSED].tolist() == [True] * 5 and got[S.CORRECT].tolist() == [False] * 5

    forms = [
        f"{refusing[0]}.",
        f"({refusing[1]})",
        f"{refusing[2]}. {SORRY}",
        SORRY,
        f"The answer is {refusing[4]}.",
    ]
    got = predictions(items, forms)
    assert got[S.REFUSED].tolist() == [True] * 5 and got[S.CORRECT].tolist() == [False] * 5

    for k in range(1, 5):  # every other option, by letter and by its text
        others = [LETTERS[(LETTERS.index(letter) + k) % 5] for letter in refusing]
        got = predictions(items, others)
        assert got[S.REFUSED].tolist() == [False] * 5, others
        assert got[S.CORRECT].tolist() == [False] * 5
        texts = [r[S.CHOICES][LETTERS.index(letter)] for r, letter in zip(rows, others, strict=True)]
        assert predictions(items, texts)[S.REFUSED].tolist() == [False] * 5, texts


@pytest.mark.parametrize("wording", REFUSAL_WORDINGS)
def test_refusal_option_wordings_are_detected(tmp_path: Path, wording: str) -> None:
    key, question, options, category = EXAMPLES[4]
    items = load_examples(tmp_path, [(key, question, [*options[:4], wording], category)])
    assert is_refusal(wording)
    assert predictions(items, ["E"])[S.REFUSED].tolist() == [True]
    assert predictions(items, ["D"])[S.REFUSED].tolist() == [False]


def test_plausible_options_are_not_refusals() -> None:
    """The other options must read as answers: a distractor detected as a refusal would turn a
    hallucination into a refusal and inflate the refusal rate."""
    for _, question, options, _ in EXAMPLES:
        for i, option in enumerate(options):
            if option != SORRY:
                assert not is_refusal(option, question=question), option
                assert not is_refusal_response(LETTERS[i], options, refusal_option=True, question=question), (
                    question,
                    option,
                )


# --- what the exporter writes ------------------------------------------------------------------------


def test_every_refusal_option_the_exporter_writes_is_detected() -> None:
    """write_unanswerable_jsonl's options come from refusal_choices: the family's answer vocabulary plus
    REFUSAL_OPTION. Over many items of every family, exactly one option is a refusal, it is REFUSAL_OPTION,
    the detector sees it, and it lands on every letter."""
    names = ["Zorbli", "Kavmep", "Trudax", "Fengow", "Lumpry"]
    assert is_refusal(REFUSAL_OPTION) and REFUSAL_OPTION == SORRY
    for family in TEMPLATES:
        vocab = set(vocabulary(family, names))
        assert not any(is_refusal(word) for word in vocab), family
        places = set()
        for n in range(40):
            row = Row(f"shapes_unanswerable/{family}{n}", "shapes_unanswerable", "unanswerable_test", "q?",
                      None, b"", family, "unanswerable")  # fmt: skip
            options = refusal_choices(row, names, salt="beyondvisqa")
            assert [o for o in options if o not in vocab] == [REFUSAL_OPTION], options
            assert [o for o in options if is_refusal(o)] == [REFUSAL_OPTION], options
            at = options.index(REFUSAL_OPTION)
            assert is_refusal_response(LETTERS[at], options, refusal_option=True)
            places.add(at)
        assert places == set(range(min(4, len(vocab)) + 1)), (family, places)
