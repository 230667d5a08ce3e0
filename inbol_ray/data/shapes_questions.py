"""ShapesWorld's questions: the families, their wordings, the invented names, and the scene-graph answer key.

Why a module of its own: `answer` is both the answer key and the proof of unanswerability, and
`referent_absent` what makes an item unanswerable by absence; they are pure functions of a question and a
scene, used by the splits (`inbol_ray.data.shapes`) and by the tests that check every item against its
scene graph. The families and why they sit where they do on the boundary: `inbol_ray.data.shapes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inbol_ray.config import ShapesConfig
from inbol_ray.data.shapes_scene import COLOURS, SHAPES, Scene

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Invented names: pronounceable, distinct, and never English words a grader could confuse.
NAME_SYLLABLES = ("zor", "bli", "kav", "mep", "tru", "dax", "fen", "gow", "lum", "pry", "quo", "sib")

TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    # family -> template set -> wordings; "id" wordings are trained on, "para" are held out (OOD)
    "colour_of": {
        "id": ("What colour is the {shape}?", "What is the colour of the {shape}?"),
        "para": ("Which colour does the {shape} have?", "Tell me the colour of the {shape}."),
    },
    "shape_of": {
        "id": ("What shape is the {colour} object?", "Which shape is {colour}?"),
        "para": ("Name the shape of the {colour} object.", "The {colour} object is which shape?"),
    },
    "count": {
        "id": ("How many {colour} objects are there?", "How many {colour} shapes are in the picture?"),
        "para": ("Count the {colour} objects in the image.", "What is the number of {colour} shapes shown?"),
    },
    "left_of": {
        "id": ("Is the {colour} {shape} left of the {colour2} {shape2}?",),
        "para": ("Is the {colour} {shape} on the left side of the {colour2} {shape2}?",),
    },
    "name_of": {
        "id": ("What do we call the {colour} {shape}?", "What is the name of the {colour} {shape}?"),
        "para": ("What is the {colour} {shape} called?", "Give the name of the {colour} {shape}."),
    },
    "exists": {
        "id": ("Is there a {shape} in the picture?", "Is there a {shape}?"),
        "para": ("Does the picture contain a {shape}?", "Can you see a {shape} in the image?"),
    },
}
FAMILY_CATEGORY = {
    "colour_of": "easy_perception",
    "shape_of": "easy_perception",
    "count": "hard_perception",
    "left_of": "hard_perception",
    "name_of": "knowledge",
    "exists": "easy_perception",
}
# Families whose question names an object: only these can be made unanswerable by mismatch.
REFERRING = ("colour_of", "shape_of", "name_of", "left_of")
FAMILY_WEIGHTS = {"colour_of": 0.22, "shape_of": 0.18, "count": 0.15, "left_of": 0.15, "name_of": 0.30,
                  "exists": 0.12}  # fmt: skip
"""Relative weights (normalised where drawn). `exists` ("Is there a circle?") is VQAv2's most common
question type besides counting; its "no" answers are what a text-only recipe can read absence from
(`inbol_ray.data.referents.absence_proof`), the only evidence that a *shape* is missing from a picture
(colours have the counting family's zeros)."""


@dataclass(frozen=True)
class Question:
    """A question in structured form; its text is one wording of `family` with these slots filled."""

    family: str
    shape: str = ""
    colour: str = ""
    shape2: str = ""
    colour2: str = ""


def invented_names(n_names: int, seed: int) -> dict[tuple[str, str], str]:
    """Deterministic invented names for the first `n_names` colour-shape combinations (shuffled)."""
    rng = np.random.default_rng(seed + 7919)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    order = rng.permutation(len(combos))[:n_names]
    syll = list(NAME_SYLLABLES)
    names: dict[tuple[str, str], str] = {}
    used: set[str] = set()
    for idx in order:
        while True:
            a, b = rng.choice(len(syll), size=2, replace=False)
            name = syll[a] + syll[b]
            if name not in used:
                used.add(name)
                names[combos[idx]] = name
                break
    return names


def rare_combos(names: dict[tuple[str, str], str], cfg: ShapesConfig) -> set[tuple[str, str]]:
    """The named combinations that training shows rarely: the model's intrinsic boundary."""
    keys = sorted(names)
    rng = np.random.default_rng(cfg.seed + 104729)
    n_rare = int(round(len(keys) * cfg.rare_name_fraction))
    picked = rng.permutation(len(keys))[:n_rare]
    return {keys[i] for i in picked}


def heldout_combos(names: dict[tuple[str, str], str], cfg: ShapesConfig) -> set[tuple[str, str]]:
    """The rare named combinations asked about only in held-out splits (val, tests); `shapes_train` asks
    about the other rare ones, and every split asks about the common ones.

    As in the real setting: popular entities turn up in every data set, the long tail does not (OVEN's
    rare training entities are not A-OKVQA's or MMBench's). So what fine-tuning teaches about a rare
    training entity (its name) cannot answer a test question, while the common names keep being rehearsed
    and the model's prior knowledge of them survives fine-tuning. Both sides hold rare names the base does
    not know, so InBoL's training items show the model its intrinsic boundary and the test sets measure it
    on entities training never named. Only what generalises can carry over: when to answer and when to
    refuse. (Splitting the common names too was tried: fine-tuning that never showed the held-out common
    names erased them, knowledge accuracy 63% -> 0-27% after every trained method, see issue 16's note.)
    """
    rare = sorted(rare_combos(names, cfg))
    rng = np.random.default_rng(cfg.seed + 15485863)
    n = int(round(len(rare) * cfg.heldout_name_fraction))
    return {rare[i] for i in rng.permutation(len(rare))[:n]}


def asked_names(
    names: dict[tuple[str, str], str], cfg: ShapesConfig, entities: str
) -> dict[tuple[str, str], str]:
    """The names a split's knowledge questions may ask for: every name ("all"), all but the held-out rare
    ones ("train"), or all but the training side's rare ones ("heldout")."""
    if entities == "all":
        return dict(names)
    held = heldout_combos(names, cfg)
    excluded = held if entities == "train" else rare_combos(names, cfg) - held
    return {k: v for k, v in names.items() if k not in excluded}


# --- questions: proposing, answering, proving unanswerable ---------------------------------------


def answer(q: Question, scene: Scene, names: dict[tuple[str, str], str]) -> str | None:
    """The gold answer from the scene graph, or None when the scene cannot answer the question.

    This one function is both the answer key and the proof of unanswerability, so the two can never
    disagree.
    """
    if q.family == "count":
        return NUMBER_WORDS[len(scene.with_colour(q.colour))]
    if q.family == "exists":
        return "yes" if scene.with_shape(q.shape) else "no"
    if q.family == "colour_of":
        found = scene.with_shape(q.shape)
        return found[0].colour if len(found) == 1 else None
    if q.family == "shape_of":
        found = scene.with_colour(q.colour)
        return found[0].shape if len(found) == 1 else None
    if q.family == "name_of":
        found = scene.find(q.colour, q.shape)
        name = names.get((q.colour, q.shape))
        return name if len(found) >= 1 and name is not None else None
    if q.family == "left_of":
        a, b = scene.find(q.colour, q.shape), scene.find(q.colour2, q.shape2)
        if len(a) != 1 or len(b) != 1 or a[0].cell[1] == b[0].cell[1]:
            return None
        return "yes" if a[0].cell[1] < b[0].cell[1] else "no"
    raise ValueError(f"unknown question family {q.family!r}")


def is_unanswerable(q: Question, scene: Scene, names: dict[tuple[str, str], str]) -> bool:
    """Scene-graph proof: no valid answer exists."""
    return answer(q, scene, names) is None


def referent_absent(q: Question, scene: Scene) -> bool:
    """The object the question refers to is not in the picture at all (for `left_of`: one of the two).

    What the mismatch construction requires, stricter than `is_unanswerable`: "What colour is the
    circle?" over two circles has no single answer too, but the fix there is to ask which circle, not
    to say the picture lacks the information. The extrinsic boundary in the paper (VizWiz, mismatched
    VQA) is absent information, so only absent referents make unanswerable items here. Counting and
    existence never do: zero and "no" are answers."""
    if q.family == "colour_of":
        return not scene.with_shape(q.shape)
    if q.family == "shape_of":
        return not scene.with_colour(q.colour)
    if q.family == "name_of":
        return not scene.find(q.colour, q.shape)
    if q.family == "left_of":
        return not scene.find(q.colour, q.shape) or not scene.find(q.colour2, q.shape2)
    return False


def propose(
    family: str,
    scene: Scene,
    rng: np.random.Generator,
    names: dict[tuple[str, str], str],
    name_weights: dict[tuple[str, str], float],
) -> Question | None:
    """A question of `family` that this scene answers, or None when the scene offers none."""
    if family == "count":
        present = sorted({o.colour for o in scene.objects})
        pool = present if rng.random() < 0.75 else list(COLOURS)  # zero is a valid count too
        return Question("count", colour=pool[int(rng.integers(len(pool)))])
    if family == "exists":  # half present, half absent (when any shape is absent), so "yes" is no prior
        present = sorted({o.shape for o in scene.objects})
        absent = [s for s in SHAPES if s not in present]
        pool = absent if absent and rng.random() < 0.5 else present
        return Question("exists", shape=pool[int(rng.integers(len(pool)))])
    if family == "colour_of":
        options = [o for o in scene.objects if len(scene.with_shape(o.shape)) == 1]
        return (
            Question("colour_of", shape=options[int(rng.integers(len(options)))].shape) if options else None
        )
    if family == "shape_of":
        options = [o for o in scene.objects if len(scene.with_colour(o.colour)) == 1]
        return (
            Question("shape_of", colour=options[int(rng.integers(len(options)))].colour) if options else None
        )
    if family == "name_of":
        options = [o for o in scene.objects if (o.colour, o.shape) in names]
        if not options:
            return None
        w = np.array([name_weights[(o.colour, o.shape)] for o in options])
        o = options[int(rng.choice(len(options), p=w / w.sum()))]
        # Thinning: keep a down-weighted name with probability equal to its weight, so its frequency
        # in the split is proportional to the weight whatever else the scene holds.
        if rng.random() >= name_weights[(o.colour, o.shape)]:
            return None
        return Question("name_of", shape=o.shape, colour=o.colour)
    if family == "left_of":
        unique = [o for o in scene.objects if len(scene.find(o.colour, o.shape)) == 1]
        pairs = [(a, b) for a in unique for b in unique if a is not b and a.cell[1] != b.cell[1]]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        return Question("left_of", shape=a.shape, colour=a.colour, shape2=b.shape, colour2=b.colour)
    raise ValueError(f"unknown question family {family!r}")


def wording(q: Question, template_set: str, rng: np.random.Generator) -> str:
    options = TEMPLATES[q.family][template_set]
    text = options[int(rng.integers(len(options)))]
    return text.format(shape=q.shape, colour=q.colour, shape2=q.shape2, colour2=q.colour2)
