"""ShapesWorld: deterministic, answers correct by construction, unanswerable items proved so."""

from __future__ import annotations

import dataclasses
import io
from collections import Counter

import numpy as np
from PIL import Image

from inbol_ray import schema as S
from inbol_ray.config import ShapesConfig
from inbol_ray.data import shapes, shapes_questions, shapes_scene

SMALL = ShapesConfig(
    n_pretrain=300, n_train=300, n_val=60, n_id_test=60, n_ood_test=60, n_unanswerable_test=60
)


def test_generation_is_deterministic_in_seed() -> None:
    a = shapes.generate_items(SMALL, 48)
    b = shapes.generate_items(SMALL, 48)
    assert a.equals(b)
    c = shapes.generate_items(ShapesConfig(**{**SMALL.__dict__, "seed": 1}), 48)
    assert not a.equals(c)


def test_items_table_matches_schema_and_splits() -> None:
    table = shapes.generate_items(SMALL, 48)
    assert table.schema.equals(S.ITEMS)
    counts = Counter(table[S.DATASET].to_pylist())
    assert counts == {
        "shapes_pretrain": 300,
        "shapes_train": 300,
        "shapes_val": 60,
        "shapes_id_test": 60,
        "shapes_ood_paraphrase": 60,
        "shapes_ood_scene": 60,
        "shapes_unanswerable": 60,
    }
    assert len(set(table[S.ID].to_pylist())) == table.num_rows
    rows = table.to_pylist()
    for r in rows:
        assert r[S.ANSWERABLE] == bool(r[S.ANSWERS])
        assert (r[S.CATEGORY] == "unanswerable") == (not r[S.ANSWERABLE])
    assert all(not r[S.ANSWERABLE] for r in rows if r[S.DATASET] == "shapes_unanswerable")
    assert all(r[S.ANSWERABLE] for r in rows if r[S.DATASET] in ("shapes_pretrain", "shapes_id_test"))
    train = [r for r in rows if r[S.DATASET] == "shapes_train"]
    assert 0.05 < np.mean([not r[S.ANSWERABLE] for r in train]) < 0.3
    val = [r for r in rows if r[S.DATASET] == "shapes_val"]
    assert {r[S.SPLIT] for r in val} == {"val"}
    assert 0.1 < np.mean([not r[S.ANSWERABLE] for r in val]) < 0.45  # answerable and unanswerable


def test_knowledge_entities_are_split_between_training_and_held_out_sets() -> None:
    """Training asks for the names of half of the rare entities, val and the test sets for the other half,
    every split for the common ones: memorising a rare training answer cannot answer a test question."""
    cfg = dataclasses.replace(SMALL, n_train=600, n_val=200, n_id_test=200)
    names = shapes.invented_names(cfg.n_names, cfg.seed)
    held, rare = shapes_questions.heldout_combos(names, cfg), shapes.rare_combos(names, cfg)
    assert held < rare and len(held) == 6  # half of the 12 rare names
    asked: dict[str, set[tuple[str, str]]] = {}
    for it in shapes.generate(cfg, 48):
        if it.question.family == "name_of":
            asked.setdefault(it.split, set()).add((it.question.colour, it.question.shape))
    assert asked["train"] & rare and not asked["train"] & held
    for split in ("val", "id_test", "ood_test", "unanswerable_test"):
        assert asked[split] & held and not asked[split] & (rare - held), split
    common = set(names) - rare
    assert asked["train"] & common and asked["id_test"] & common  # the head is shared, the tail is not


def test_answers_are_correct_by_scene_graph_and_unanswerable_items_are_proved() -> None:
    names = shapes.invented_names(SMALL.n_names, SMALL.seed)
    n_unanswerable = 0
    for it in shapes.generate(SMALL, 48):
        gold = shapes.answer(it.question, it.scene, names)
        assert gold == it.answer
        if it.category == "unanswerable":
            n_unanswerable += 1
            assert shapes_questions.is_unanswerable(it.question, it.scene, names)
            assert it.question.family in shapes.REFERRING
    assert n_unanswerable >= 60


def test_answer_key_on_a_hand_built_scene() -> None:
    names = {("red", "circle"): "zorbli"}
    scene = shapes_scene.Scene(
        objects=(
            shapes_scene.Obj("circle", "red", True, (0, 0)),
            shapes_scene.Obj("square", "blue", False, (1, 2)),
            shapes_scene.Obj("square", "green", False, (2, 1)),
        ),
        background=(255, 255, 255),
    )
    Q = shapes.Question
    assert shapes.answer(Q("count", colour="red"), scene, names) == "one"
    assert shapes.answer(Q("count", colour="yellow"), scene, names) == "zero"
    assert shapes.answer(Q("colour_of", shape="circle"), scene, names) == "red"
    assert shapes.answer(Q("colour_of", shape="square"), scene, names) is None  # two squares: ambiguous
    assert shapes.answer(Q("colour_of", shape="triangle"), scene, names) is None  # absent
    assert shapes.answer(Q("shape_of", colour="blue"), scene, names) == "square"
    assert shapes.answer(Q("name_of", colour="red", shape="circle"), scene, names) == "zorbli"
    assert shapes.answer(Q("name_of", colour="blue", shape="square"), scene, names) is None  # unnamed
    left = Q("left_of", shape="circle", colour="red", shape2="square", colour2="blue")
    assert shapes.answer(left, scene, names) == "yes"
    right = Q("left_of", shape="square", colour="blue", shape2="circle", colour2="red")
    assert shapes.answer(right, scene, names) == "no"


def test_rendering_puts_each_object_in_its_cell_with_its_colour() -> None:
    scene = shapes_scene.Scene(
        objects=(shapes_scene.Obj("square", "red", True, (1, 2)),), background=(245, 245, 245)
    )
    img = np.asarray(Image.open(io.BytesIO(shapes_scene.render(scene, 48))).convert("RGB"))
    assert img.shape == (48, 48, 3)
    assert tuple(img[24, 40]) == shapes_scene.COLOURS["red"]  # centre of row 1, column 2
    assert tuple(img[8, 8]) == (245, 245, 245)


def test_rare_names_are_rare_in_pretraining_only() -> None:
    cfg = ShapesConfig(n_pretrain=3000, n_train=3000, n_id_test=10, n_ood_test=10, n_unanswerable_test=10)
    names = shapes.invented_names(cfg.n_names, cfg.seed)
    rare = {names[k] for k in shapes.rare_combos(names, cfg)}
    assert len(rare) == round(cfg.n_names * cfg.rare_name_fraction)
    seen: dict[str, Counter] = {"shapes_pretrain": Counter(), "shapes_train": Counter()}
    for it in shapes.generate(cfg, 48):
        if it.dataset in seen and it.category == "knowledge":
            seen[it.dataset]["rare" if it.answer in rare else "common"] += 1
    pre, train = seen["shapes_pretrain"], seen["shapes_train"]
    assert pre["rare"] < 0.05 * pre["common"]
    assert train["rare"] > 0.5 * train["common"]


def test_ood_splits_differ_from_id() -> None:
    rows = shapes.generate_items(SMALL, 48).to_pylist()
    id_questions = {r[S.QUESTION] for r in rows if r[S.DATASET] == "shapes_id_test"}
    para = [r[S.QUESTION] for r in rows if r[S.DATASET] == "shapes_ood_paraphrase"]
    assert not (set(para) & id_questions)
    scene_items = [it for it in shapes.generate(SMALL, 48) if it.dataset == "shapes_ood_scene"]
    assert min(len(it.scene.objects) for it in scene_items) >= shapes_scene.OOD_STYLE.min_objects


def test_corpus_covers_every_answer_word() -> None:
    words = set(" ".join(shapes.corpus(SMALL)).lower().replace("?", " ").replace(".", " ").split())
    for r in shapes.generate_items(SMALL, 48).to_pylist():
        for a in r[S.CHOICES] or r[S.ANSWERS]:  # multiple choice: every option, the answer is its letter
            assert a in words


def test_a_share_of_pretraining_is_multiple_choice_with_letter_answers() -> None:
    """As in LLaVA-1.5's training mix: options, sometimes a hint first, the gold answer as its letter."""
    items = shapes.generate_items(SMALL, 48).to_pylist()
    mc = [r for r in items if r[S.CHOICES]]
    pretrain = [r for r in items if r[S.SPLIT] == "pretrain"]
    assert mc and all(r[S.SPLIT] == "pretrain" and r[S.METRIC] == "mc_letter" for r in mc)
    assert 0.1 < len(mc) / len(pretrain) < 0.4  # pretrain_multiple_choice = 0.25
    plain = {it.id: it for it in shapes.generate(SMALL, 48)}
    for r in mc:
        letter = r[S.ANSWERS][0]
        assert r[S.CHOICES]["ABCDEFGHIJ".index(letter)] == plain[r[S.ID]].answer
        assert r[S.QUESTION].endswith(plain[r[S.ID]].text)  # the same question, a hint line at most before it
    assert any(r[S.QUESTION].startswith("Context: ") for r in mc) and any(
        "\n" not in r[S.QUESTION] for r in mc
    )
    no_mc = dataclasses.replace(SMALL, pretrain_multiple_choice=0.0)
    assert not any(r[S.CHOICES] for r in shapes.generate_items(no_mc, 48).to_pylist())


def test_no_test_item_copies_a_trained_image_question_pair() -> None:
    """A test item identical to a pretraining or training item (same rendered image, same words) measures
    memory, not the information boundary; before the generator skipped them, 52 of 400 in-domain test
    items were such copies."""
    rows = shapes.generate_items(SMALL, 48).to_pylist()
    trained = {(r[S.IMAGE], r[S.QUESTION]) for r in rows if r[S.SPLIT] in shapes.TRAINED_SPLITS}
    tests = [r for r in rows if r[S.SPLIT] not in shapes.TRAINED_SPLITS]
    assert len(tests) == 60 * 5  # val and the four test sets
    assert not [r[S.ID] for r in tests if (r[S.IMAGE], r[S.QUESTION]) in trained]
    # small scenes repeat, so images alone are shared across splits (only exact pairs are excluded)
    assert {r[S.IMAGE] for r in tests} & {img for img, _ in trained}
    # at this size no pair would repeat by chance (at the default size 52 of 400 did): the exclusion itself
    spec = next(sp for sp in shapes.split_specs(SMALL) if sp.split == "id_test")
    first = [
        (it.image, it.text) for _, it in zip(range(5), shapes.iter_split(spec, SMALL, 48, 7), strict=False)
    ]
    again = [
        (it.image, it.text)
        for _, it in zip(range(5), shapes.iter_split(spec, SMALL, 48, 7, seen={first[0]}), strict=False)
    ]
    assert again[0] == first[1] and first[0] not in again


def test_unanswerable_items_lack_the_referent_rather_than_make_it_ambiguous() -> None:
    """Every unanswerable item (test and training) asks about an object the picture does not contain:
    never "What colour is the circle?" over two circles, which lacks a unique answer, not information."""
    unanswerable = [it for it in shapes.generate(SMALL, 48) if it.category == "unanswerable"]
    assert len(unanswerable) >= 60
    assert all(shapes.referent_absent(it.question, it.scene) for it in unanswerable)
    circles = (
        shapes_scene.Obj("circle", "red", True, (0, 0)),
        shapes_scene.Obj("circle", "blue", False, (1, 1)),
    )
    two = shapes_scene.Scene(objects=circles, background=(255, 255, 255))
    q = shapes.Question("colour_of", shape="circle")
    assert shapes_questions.is_unanswerable(q, two, {}) and not shapes.referent_absent(q, two)
    assert shapes.referent_absent(shapes.Question("colour_of", shape="square"), two)
    assert not shapes.referent_absent(shapes.Question("count", colour="green"), two)  # zero is an answer
