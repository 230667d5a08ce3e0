"""ShapesWorld: a procedural image-question benchmark whose scene graphs prove every answer.

Why it exists: no data set can be downloaded here, and the method needs items on both sides of both
information boundaries. Every image comes from a scene graph (objects with shape, colour, size, grid
cell), so each gold answer is correct by construction and each unanswerable item is *proved*
unanswerable: the object its question refers to is not in the picture (the extrinsic boundary).

Question families (the `category` column):
- `easy_perception`: colour of the unique <shape>, shape of the unique <colour> object, or whether a
  <shape> is in the picture at all (VQAv2's "Is there a ...?": its "no" answers are the text evidence of
  a shape's absence that prepare's mismatch recipe reads, as in real VQAv2);
- `hard_perception`: counting the objects of one colour, and left/right relations between two named
  objects (both need several lookups, where a single lookup suffices for the easy family);
- `knowledge`: the invented name of a colour-shape combination present in the image. Names are drawn
  with a skewed frequency, so a briefly trained model knows the common ones and not the rare ones
  (the intrinsic boundary);
- unanswerable items reuse the referring families on an image whose scene graph lacks the referent
  (category `unanswerable`).

Splits and data set names: `shapes_pretrain` (the base model's own training data: answerable only,
rare names almost absent), `shapes_train` (InBoL's training items), `shapes_val` (answerable +
unanswerable, for choosing settings), `shapes_id_test` (same distribution, unseen images),
`shapes_ood_paraphrase` (unseen question wordings), `shapes_ood_scene` (unseen scene statistics: more,
smaller objects on another background), `shapes_unanswerable` (mismatched questions only).

How each choice mirrors the real setting (LLaVA-1.5, trained with InBoL on VQAv2 + OVEN, tested on other sets):
- The base model has been trained on its own data (`shapes_pretrain`, as LLaVA-1.5 on its instruction
  mix, VQAv2 included), so fine-tuning on `shapes_train` has little perception left to teach.
- The long tail of knowledge entities is split (`heldout_combos`): `shapes_train` asks for the names of
  half of the rare entities, the validation and test splits for the other half, and every split for the
  common ones. As OVEN's rare entities are not the test sets', memorising training answers cannot raise
  test accuracy; what can carry over is when to answer and when to refuse.
- The intrinsic boundary (rare names, counting, relations) and the extrinsic one (absent referents, never
  ambiguous ones) are on every evaluated split, so each is measured where it is trained.
- No held-out item repeats a pretrain or train (image, question) pair (`iter_split`'s `seen`): the real
  test sets share none with VQAv2 train.
- Settings are chosen on `shapes_val` (held-out entities and images); the test sets make the final table.

Scenes and their rendering live in `shapes_scene.py`, the questions and their answer key in
`shapes_questions.py`; this module builds the splits and the `items` table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from inbol_ray import schema as S
from inbol_ray.config import ShapesConfig
from inbol_ray.data.shapes_questions import (
    FAMILY_CATEGORY,
    FAMILY_WEIGHTS,
    NUMBER_WORDS,
    REFERRING,
    TEMPLATES,
    Question,
    answer,
    asked_names,
    invented_names,
    propose,
    rare_combos,
    referent_absent,
    wording,
)
from inbol_ray.data.shapes_scene import (
    COLOURS,
    ID_STYLE,
    OOD_STYLE,
    SHAPES,
    Scene,
    SceneStyle,
    render,
    sample_scene,
)

VERSION = "shapesworld-v4"
"""v2: no test item copies a trained (image, question) pair; unanswerable items lack their referent.
v3: the rare knowledge entities split between training and held-out splits; the validation split.
v4: the existence family ("Is there a circle?"), so a text-only recipe can prove a shape absent (issue 14)."""


# --- splits -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSpec:
    dataset: str
    split: str
    n: int
    style: SceneStyle
    template_set: str
    unanswerable_fraction: float
    skew_names: bool = False  # only the base model's pretraining data hides the rare names
    entities: str = "all"  # whose names knowledge questions ask: "all", "train" or "heldout" (heldout_combos)


def split_specs(cfg: ShapesConfig) -> list[SplitSpec]:
    held = "heldout"
    n_unans, val_unans = cfg.n_unanswerable_test, cfg.val_unanswerable_fraction
    return [
        SplitSpec("shapes_pretrain", "pretrain", cfg.n_pretrain, ID_STYLE, "id", 0.0, skew_names=True),
        SplitSpec(
            "shapes_train", "train", cfg.n_train, ID_STYLE, "id", cfg.unanswerable_fraction, entities="train"
        ),
        SplitSpec("shapes_val", "val", cfg.n_val, ID_STYLE, "id", val_unans, entities=held),
        SplitSpec("shapes_id_test", "id_test", cfg.n_id_test, ID_STYLE, "id", 0.0, entities=held),
        SplitSpec("shapes_ood_paraphrase", "ood_test", cfg.n_ood_test, ID_STYLE, "para", 0.0, entities=held),
        SplitSpec("shapes_ood_scene", "ood_test", cfg.n_ood_test, OOD_STYLE, "id", 0.0, entities=held),
        SplitSpec("shapes_unanswerable", "unanswerable_test", n_unans, ID_STYLE, "id", 1.0, entities=held),
    ]


@dataclass(frozen=True)
class ShapesItem:
    """One generated item with the structure the tests need to check it against its scene graph."""

    id: str
    dataset: str
    split: str
    scene: Scene
    question: Question
    text: str
    answer: str | None
    category: str
    image: bytes


def _mismatch(q: Question, rng: np.random.Generator, style: SceneStyle) -> Scene:
    """A fresh scene that lacks what `q` refers to (rejection sampling on the scene graph): unanswerable by
    absence, never by ambiguity (`referent_absent`)."""
    for _ in range(1000):
        scene = sample_scene(rng, style)
        if referent_absent(q, scene):  # absent implies unanswerable (tests check every item's answer key)
            return scene
    raise RuntimeError(f"could not build a mismatched scene for {q}")  # pragma: no cover


def iter_split(
    spec: SplitSpec,
    cfg: ShapesConfig,
    image_size: int,
    split_seed: int,
    seen: set[tuple[bytes, str]] | None = None,
) -> Iterator[ShapesItem]:
    """The split's items. A candidate whose (image, question text) is in `seen` is skipped: a test item that
    copies a training item exactly measures memory, not the boundary (the real test sets share no
    image-question pair with VQAv2 train)."""
    names = invented_names(cfg.n_names, cfg.seed)
    rare = rare_combos(names, cfg)
    weights = {k: (cfg.rare_name_weight if k in rare and spec.skew_names else 1.0) for k in names}
    asked = asked_names(names, cfg, spec.entities)  # what the split may ask; answers come from every name
    rng = np.random.default_rng(split_seed)
    families = list(FAMILY_WEIGHTS)
    fam_p = np.array([FAMILY_WEIGHTS[f] for f in families])
    ref_p = np.array([FAMILY_WEIGHTS[f] for f in REFERRING])
    made = 0
    while made < spec.n:
        unanswerable = rng.random() < spec.unanswerable_fraction
        pool, p = (list(REFERRING), ref_p) if unanswerable else (families, fam_p)
        family = pool[int(rng.choice(len(pool), p=p / p.sum()))]
        scene = sample_scene(rng, spec.style)
        q = propose(family, scene, rng, asked, weights)
        if q is None:
            continue
        if unanswerable:
            scene = _mismatch(q, rng, spec.style)
        gold = answer(q, scene, names)
        text, image = wording(q, spec.template_set, rng), render(scene, image_size)
        if seen is not None and (image, text) in seen:
            continue
        yield ShapesItem(
            id=f"{spec.dataset}-{made:06d}",
            dataset=spec.dataset,
            split=spec.split,
            scene=scene,
            question=q,
            text=text,
            answer=gold,
            category="unanswerable" if unanswerable else FAMILY_CATEGORY[family],
            image=image,
        )
        made += 1


TRAINED_SPLITS = ("pretrain", "train")
"""What a model may have seen: no test item repeats one of these splits' (image, question) pairs."""


def generate(cfg: ShapesConfig, image_size: int) -> Iterator[ShapesItem]:
    trained: set[tuple[bytes, str]] = set()
    for i, spec in enumerate(split_specs(cfg)):
        seen = None if spec.split in TRAINED_SPLITS else trained
        for it in iter_split(spec, cfg, image_size, split_seed=cfg.seed * 1000 + i, seen=seen):
            if spec.split in TRAINED_SPLITS:
                trained.add((it.image, it.text))
            yield it


HINT_STYLES = ("", "Context: ", "Hint: ")
"""How a multiple-choice pretrain item states its context: none, ScienceQA's prefix, MMBench's (as the
loaders write them), so the base model meets every form a real multiple-choice set shows it."""


def as_multiple_choice(it: ShapesItem, names: list[str]) -> tuple[str, list[str], str]:
    """(question, options, gold letter) of an answerable item asked as multiple choice.

    Why in pretraining: LLaVA-1.5's own training mix has multiple-choice data with the option-letter
    instruction, which is why the real model answers ScienceQA/MMBench/MMMU with a letter. The tiny base
    must learn the same convention, or the real-format rehearsal's multiple-choice sets would measure a
    format it never saw. Options and hint are drawn as the exporters draw them, seeded by the item id.
    """
    from inbol_ray.data.export.questions import HINTS, Row, multiple_choice, rng_for

    row = Row(it.id, it.dataset, it.split, it.text, it.answer, b"", it.question.family, it.category)
    options, gold = multiple_choice(row, names, salt="pretrain-mc")
    style = HINT_STYLES[int(rng_for(it.id, "pretrain-hint").integers(len(HINT_STYLES)))]
    question = f"{style}{HINTS[it.question.family]}\n{it.text}" if style else it.text
    return question, options, "ABCDEFGHIJ"[gold]


def _is_multiple_choice(it: ShapesItem, cfg: ShapesConfig) -> bool:
    """A fixed share of answerable pretrain items, picked by a hash of the id (not the split's rng, whose
    stream every other item depends on)."""
    if it.split != "pretrain" or it.answer is None or cfg.pretrain_multiple_choice <= 0:
        return False
    digest = hashlib.blake2b(f"mc:{it.id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < cfg.pretrain_multiple_choice


def generate_items(cfg: ShapesConfig, image_size: int) -> pa.Table:
    """All splits as one `items` table (DESIGN.md section 3), deterministic from `cfg.seed`."""
    rows: dict[str, list] = {name: [] for name in S.ITEMS.names}
    source = f"{VERSION}:seed={cfg.seed}"
    names = sorted(invented_names(cfg.n_names, cfg.seed).values())
    for it in generate(cfg, image_size):
        question, choices, answers, metric = (
            it.text,
            None,
            [it.answer] if it.answer is not None else [],
            "exact",
        )
        if _is_multiple_choice(it, cfg):
            question, choices, letter = as_multiple_choice(it, names)
            answers, metric = [letter], "mc_letter"
        rows[S.ID].append(it.id)
        rows[S.DATASET].append(it.dataset)
        rows[S.SPLIT].append(it.split)
        rows[S.IMAGE].append(it.image)
        rows[S.IMAGE_PATH].append(None)
        rows[S.QUESTION].append(question)
        rows[S.ANSWERS].append(answers)
        rows[S.CHOICES].append(choices)
        rows[S.METRIC].append(metric)
        rows[S.ANSWERABLE].append(it.answer is not None)
        rows[S.CATEGORY].append(it.category)
        rows[S.SOURCE].append(source)
    return pa.Table.from_pydict(rows, schema=S.ITEMS)


def corpus(cfg: ShapesConfig) -> list[str]:
    """Every word the benchmark can produce, in context, for training the tiny model's tokenizer."""
    names = invented_names(cfg.n_names, cfg.seed)
    lines: list[str] = []
    for fam, sets in TEMPLATES.items():
        for texts in sets.values():
            for t in texts:
                for colour in COLOURS:
                    for shape in SHAPES:
                        lines.append(t.format(shape=shape, colour=colour, shape2=shape, colour2=colour))
        del fam
    lines += list(COLOURS) + list(SHAPES) + list(NUMBER_WORDS) + ["yes", "no"] + list(names.values())
    return lines
