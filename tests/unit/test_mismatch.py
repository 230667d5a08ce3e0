"""The image-question mismatch recipe (inbol_ray.data.mismatch): text rules, building rows, config fields.

The corpus (tests/unit/mismatch_helpers.py) has two data sets of 40 images each; every noun is mentioned on
exactly one image, so every referent is rare in both pools and every eligible question can be built: what a
test sees is the recipe's rules, not luck in the draws. Own pool first, COCO instances, the fill limit and
the sharded staged path: tests/unit/test_mismatch_pools.py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from inbol_ray.config import ConfigError, DataConfig, DatasetSpec, load_config
from inbol_ray.data.mismatch import build_mismatches, image_key, summary
from inbol_ray.data.referents import absence_proof, exclusion_reason, referent_terms, variants, words
from inbol_ray.schema import (
    ANSWERABLE,
    ANSWERS,
    CATEGORY,
    CHOICES,
    DATASET,
    ID,
    IMAGE,
    IMAGE_PATH,
    ITEMS,
    METRIC,
    QUESTION,
    SOURCE,
    SPLIT,
)
from tests.unit.mismatch_helpers import by_id, corpus, item, parts

# --- words and questions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "terms"),
    [
        ("What color is the bus?", {"bus"}),
        ("What is the colour of the circle?", {"circle"}),  # "the colour" names an attribute
        ("What do we call the red circle?", {"red", "circle"}),
        ("What shape is the red object?", {"red"}),  # "object" says nothing the image could lack
        ("What is the man holding?", {"man"}),  # the -ing verb ends the phrase
        ("Why is the red car parked?", {"red", "car"}),  # participles describe, they are no referent
        ("Where was the photo taken?", set()),
        ("What is on the man's shirt?", {"man", "shirt"}),
        ("what is this building?", {"building"}),  # -ing nouns stay
        ("What room is this?", set()),  # about the whole picture
        ("What is the weather like?", set()),
        ("Which shape is red?", set()),  # no noun phrase to anchor on: not eligible
    ],
)
def test_referent_terms(question: str, terms: set[str]) -> None:
    assert referent_terms(question) == terms


def test_plurals_match_both_ways() -> None:
    assert "bus" in variants("buses") and "glass" in variants("glasses") and "pony" in variants("ponies")
    assert variants("bus") == {"bus"}  # a 2-letter stem is no word
    assert words("The man's HAT, isn't it?") == ["the", "man", "hat", "isn", "it"]


@pytest.mark.parametrize(
    ("question", "answers", "extra", "reason"),
    [
        ("What color is the bus?", ["red"], {}, None),
        ("Which colour is the square?", ["B"], {CHOICES: ["red", "blue"], METRIC: "mc_letter"}, "multiple choice"),
        ("Is there a dog?", ["no"], {}, "yes/no question"),
        ("Does the man wear a hat?", ["yes"], {}, "yes/no question"),
        ("The dog is brown?", ["yes", "yes", "no"], {}, "yes/no question"),  # the answers say yes/no
        ("How many buses are in the street?", ["2"], {}, "counting question"),
        ("What is in the bowl?", ["nothing"], {}, "a gold answer means none"),
        ("What number is on the bus?", ["0"], {}, "a gold answer means none"),
        ("What room is this?", ["kitchen"], {}, "no referring noun phrase"),
    ],
)  # fmt: skip
def test_exclusion_reasons(question: str, answers: list[str], extra: dict, reason: str | None) -> None:
    assert exclusion_reason(item("x:1", "x", "x.jpg", question, answers, **extra)) == reason


def test_absence_proofs() -> None:
    def proof(question: str, answers: list[str]) -> set[str]:
        return set(absence_proof(item("x:1", "x", "x.jpg", question, answers)))

    assert proof("How many dogs are there?", ["0"] * 7 + ["1"] * 3) == {"dogs"}
    assert proof("How many red objects are there?", ["zero"]) == {"red"}
    assert proof("Is there a cat in the picture?", ["no"] * 10) == {"cat"}
    assert proof("How many dogs are there?", ["2"] * 10) == set()  # present
    assert proof("Is there a cat?", ["yes"] * 10) == set()


# --- building rows ---------------------------------------------------------------------------------------


def test_builds_the_wanted_number_deterministically() -> None:
    rows = corpus()
    result = build_mismatches(rows, 0.25, seed=1)
    c = result.counts
    assert (c["answerable"], c["wanted"], c["eligible"], c["built"], c["short"]) == (120, 30, 80, 30, 0)
    assert c["excluded: yes/no question"] == 40
    assert build_mismatches(rows, 0.25, seed=1).rows == result.rows
    assert build_mismatches(rows, 0.25, seed=2).rows != result.rows


def test_rows_are_unanswerable_items_on_another_images_picture() -> None:
    rows = corpus()
    source = by_id(rows)
    result = build_mismatches(rows, 0.5, max_image_uses=1)
    assert result.counts["built"] == 60
    assert len({r[ID] for r in result.rows}) == 60  # ids unique
    questions = Counter(parts(r)[0] for r in result.rows)
    assert max(questions.values()) == 1  # each question once
    assert max(Counter(image_key(r) for r in result.rows).values()) == 1  # max_image_uses
    crossed = 0
    for row in result.rows:
        qid, iid = parts(row)
        question, image = source[qid], source[iid]
        assert image_key(question) != image_key(image), row[ID]  # never its own image
        assert row[IMAGE_PATH] == image[IMAGE_PATH] and row[IMAGE] is None
        assert row[QUESTION] == question[QUESTION]
        assert (row[DATASET], row[SPLIT], row[ANSWERS], row[CHOICES]) == (f"{question[DATASET]}_mismatch", "train", [], None)  # fmt: skip
        assert (row[METRIC], row[ANSWERABLE], row[CATEGORY]) == ("exact", False, "unanswerable")
        assert qid in row[SOURCE] and iid in row[SOURCE]
        crossed += image[DATASET] != question[DATASET]
        image_text = " ".join(r[QUESTION] for r in rows if image_key(r) == image_key(image))
        assert not referent_terms(question[QUESTION]) & set(words(image_text)), row[ID]
        assert set(row) == set(ITEMS.names)
    # Own pool first: with each image used once, at most the last question of a pool finds only its own
    # image left there and crosses; every crossing is counted.
    assert crossed == result.counts["cross_dataset"] <= 2


def test_an_image_showing_the_gold_answer_is_never_chosen() -> None:
    question = item("a:1", "a", "a/1.jpg", "What is the name of this building?", ["Eiffel Tower"])
    shows = item("b:1", "b", "b/1.jpg", "Where was the photo taken?", ["eiffel tower"])
    other = item("b:2", "b", "b/2.jpg", "Is the car red?", ["yes"])  # not eligible itself
    for seed in range(10):
        result = build_mismatches([question, shows, other], 1 / 3, seed=seed, max_referent_share=1.0)
        assert [parts(r) for r in result.rows] == [("a:1", "b:2")]


def test_common_referents_need_a_proof_of_absence() -> None:
    """ "the dog" on 30 of 31 images: not mentioning it proves little, so only an image proved dog-free
    (a counting question answered 0) may carry a dog question; without one the question fails, counted."""
    rows = [item(f"a:{i}", "a", f"a/{i}.jpg", "What is the dog doing?", ["sleeping"]) for i in range(30)]
    rows.append(item("b:0", "b", "b/0.jpg", "Is the car red?", ["yes"]))
    without = build_mismatches(rows, 0.1)
    assert without.rows == [] and without.counts["short"] == without.counts["wanted"] == 3
    assert without.counts["failed: referent common in every pool, no proof of absence"] == 30
    proof = item("a:99", "a", "a/99.jpg", "How many dogs are in the picture?", ["0"] * 10)
    with_proof = build_mismatches([*rows, proof], 0.1, max_image_uses=5)
    assert [parts(r)[1] for r in with_proof.rows] == ["a:99"] * 3
    assert with_proof.counts["built_by_proof"] == 3
    assert all(r[SOURCE].startswith("mismatch by proof: question a:") for r in with_proof.rows)


def test_fewer_rows_than_wanted_are_counted_never_silent() -> None:
    result = build_mismatches(corpus(), 1.0)  # 120 wanted, 80 eligible
    c = result.counts
    assert c["wanted"] == 120 and c["built"] == len(result.rows) <= 80
    assert c["short"] == c["wanted"] - c["built"] > 0
    assert c["built"] == c["built_by_proof"] + c["built_by_rare_pool"]
    failed = sum(v for k, v in c.items() if k.startswith("failed: "))
    assert c["built"] + failed == c["eligible"]  # every eligible question was tried once
    assert summary(c).startswith(f"mismatch built {c['built']} of 120 wanted ({c['short']} short")


def test_only_answerable_training_rows_take_part() -> None:
    rows = corpus()
    rows.append(item("t:1", "t", "t/1.jpg", "What color is the kettle?", ["red"], split="id_test"))
    rows.append(item("u:1", "u", "u/1.jpg", "What color is the teapot?", [], answerable=False))
    result = build_mismatches(rows, 1.0)
    used = {i for r in result.rows for i in parts(r)}
    assert not used & {"t:1", "u:1"} and result.counts["answerable"] == 120


def test_embedded_images_are_keyed_by_content() -> None:
    a = item("a:1", "a", None, "What color is the bus?", ["red"], **{IMAGE: b"png-a"})
    a2 = item("a:2", "a", None, "What is the bus driver wearing?", ["hat"], **{IMAGE: b"png-a"})
    b = item("b:1", "b", None, "What color is the kite?", ["blue"], **{IMAGE: b"png-b"})
    assert image_key(a) == image_key(a2) != image_key(b)
    result = build_mismatches([a, a2, b], 1.0, max_referent_share=1.0, max_image_uses=3)
    assert {parts(r) for r in result.rows} == {("b:1", "a:1"), ("a:2", "b:1"), ("a:1", "b:1")}
    assert all(r[IMAGE] in (b"png-a", b"png-b") and r[IMAGE_PATH] is None for r in result.rows)


def test_ratio_zero_builds_nothing_and_negative_is_an_error() -> None:
    assert build_mismatches(corpus(), 0.0).rows == []
    with pytest.raises(ValueError, match="ratio must be >= 0"):
        build_mismatches(corpus(), -0.1)


# --- config ---------------------------------------------------------------------------------------------


def spec(name: str) -> DatasetSpec:
    return DatasetSpec(name=name, path=f"/data/{name}.json")


def test_config_checks_the_ratio() -> None:
    with pytest.raises(ConfigError, match="unanswerable_per_answerable must be >= 0"):
        DataConfig(source="files", datasets=[spec("v")], unanswerable_per_answerable=-1.0)
    with pytest.raises(ConfigError, match="shapes.unanswerable_fraction"):
        DataConfig(source="shapes", unanswerable_per_answerable=0.2)
    with pytest.raises(ConfigError, match="rename"):
        DataConfig(source="files", datasets=[spec("vqav2_mismatch")], unanswerable_per_answerable=0.2)
    DataConfig(source="files", datasets=[spec("vqav2_mismatch")])  # a plain name while nothing is built
    with pytest.raises(ConfigError, match="mismatch_max_referent_share"):
        DataConfig(source="files", datasets=[spec("v")], mismatch_max_referent_share=1.5)


@pytest.mark.parametrize("name", ["llava-1.5-7b.yaml", "llava-1.5-13b.yaml"])
def test_real_scale_configs_train_on_mismatched_rows(name: str) -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / name)
    ratio = cfg.data.unanswerable_per_answerable
    assert 0.15 <= ratio / (1 + ratio) <= 0.16  # 15% of training rows, as the tiny default's ShapesWorld
