"""Unanswerable training items from answerable ones: a training question put on another training image.

Why: InBoL's extrinsic boundary needs training items that nobody can answer from the picture, and the
paper's training sets (VQAv2, ScienceQA, OVEN) hold none. Pairing a question with an image that lacks
what the question asks about makes one. Only the items' text is known here (no vision model runs in
prepare), so every rule below trades eligible questions for precision: a wrongly "unanswerable" row
teaches the model to refuse a question it should answer, which is worse than building fewer rows.

The recipe (`build_mismatches`), each rule with its reason:

1. Questions: answerable `train` rows only, and only questions that refer to a specific thing by a noun
   phrase ("the bus", "this building", "the red circle"): the referent's words (`referent_terms`, minus
   words that name the whole picture or an attribute: "the picture", "the colour", "the left") are what
   the chosen image must lack (`inbol_ray.data.referents` reads them from the text). Excluded
   (`exclusion_reason`), because a mismatched image leaves a valid answer: multiple-choice rows (their
   options and "Context:" hints carry the answer, and a letter is always answerable); yes/no questions
   ("Is there a dog?": "no" is right on an image without one); counting questions ("how many": "0" is
   right); questions with a gold answer meaning none/zero/no; and questions with no referring noun phrase
   ("What room is this?", "Which shape is red?"), which are about the picture as a whole or name their
   referent in a way this recipe cannot parse.
2. Images: the distinct images of answerable `train` rows (one per `image_path`, or per bytes when the
   image is embedded), never the question's own. An image's *mentions* are the words of all its own
   items (questions, answers, options). The chosen image must mention none of the referent's words (any
   word, not all: "the red circle" rejects every image that mentions red or a circle) and must not
   mention all words of any of the question's gold answers (an OVEN "Blue jay" photo answers "What
   bird is this?" without the word "bird").
3. Evidence of absence comes first: an image whose own item proves the referent absent (a counting
   question answered 0, or "Is there a ...?" answered no, whose words are all among the referent's) is
   preferred to any other. These items are proofs, not mentions.
4. Otherwise the image comes from a pool (one data set's images) in which the referent is rare: not
   mentioning a word is weak evidence for common things (most photos show a person whether or not a
   question says so), strong evidence for rare ones. A pool qualifies when the share of its images that
   mention all the referent's words, (m + 1) / (n + 1), is at most `max_referent_share` (add-one: a pool
   of ten images never claims anything is rarer than one in eleven). Other data sets' pools are tried
   before the question's own (another image source or domain rarely holds the same things). A question
   whose referent is common in every pool and has no proof image is not built.
5. The new row: id `mismatch:<question id>@<image row id>`, data set `<question's data set>_mismatch`,
   split `train`, the question's text, the image's bytes or path (so prepare's image check treats it as
   any row), answers [], no choices, metric `exact`, answerable false, category `unanswerable`, source
   naming both rows and how the image was chosen. Each question is used at most once, each image at most `max_image_uses` times.

`round(n_answerable * ratio)` rows are wanted; eligible questions are tried in a seeded random order until
that many are built. Fewer is never silent: `MismatchResult.counts` says how many were wanted and built,
why each tried question failed, and why each excluded row was excluded.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inbol_ray.data.referents import (
    absence_proof,
    exclusion_reason,
    normalised,
    referent_terms,
    variants,
    words,
)
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

SUFFIX = "_mismatch"
"""Data set name of the rows built from data set X: `X_mismatch`."""

# --- which images ---------------------------------------------------------------------------------------


def image_key(row: Mapping[str, Any]) -> str:
    """One key per distinct image: its path, or a digest of embedded bytes (MMMU/MMBench-style rows)."""
    if row[IMAGE_PATH]:
        return f"path:{row[IMAGE_PATH]}"
    return "sha1:" + hashlib.sha1(bytes(row[IMAGE] or b"")).hexdigest()


@dataclass
class _Image:
    row: Mapping[str, Any]  # the first row showing this image: its id, image and data set
    mentions: set[str] = field(default_factory=set)  # variants of every word its own items use
    proofs: list[frozenset[str]] = field(default_factory=list)


def _index(rows: Sequence[Mapping[str, Any]]) -> dict[str, _Image]:
    images: dict[str, _Image] = {}
    for row in rows:
        image = images.setdefault(image_key(row), _Image(row))
        proof = absence_proof(row)
        if proof:
            image.proofs.append(proof)
            continue
        text = " ".join([row[QUESTION], *(row[ANSWERS] or []), *(row[CHOICES] or [])])
        for w in words(text):
            image.mentions |= variants(w)
    return images


def _mentions(image: _Image, term: str) -> bool:
    return bool(variants(term) & image.mentions)


def _acceptable(image: _Image, terms: frozenset[str], answers: list[set[str]]) -> bool:
    if any(_mentions(image, t) for t in terms):
        return False
    return not any(a and all(_mentions(image, w) for w in a) for a in answers)


def _covers(proof: frozenset[str], terms: frozenset[str]) -> bool:
    """A proof covers a referent when each proved-absent word is one of the referent's words."""
    return all(any(variants(p) & variants(t) for t in terms) for p in proof)


@dataclass
class MismatchResult:
    rows: list[dict[str, Any]]
    """The new `items` rows, in the order they were built."""
    counts: dict[str, int]
    """`answerable`, `wanted`, `eligible`, `built`, `built_by_proof`, `built_by_rare_pool`, `short`
    (wanted - built), then `excluded: <reason>` per excluded question and `failed: <reason>` per tried
    question that found no image (only reasons that occurred)."""


def summary(counts: Mapping[str, int]) -> str:
    """One line for logs: what was wanted, what was built, and why any fell short."""
    fails = "; ".join(f"{k[len('failed: ') :]}: {v}" for k, v in counts.items() if k.startswith("failed: "))
    line = (
        f"mismatch built {counts['built']} of {counts['wanted']} wanted ({counts['short']} short, "
        f"{counts['eligible']} of {counts['answerable']} answerable questions eligible)"
    )
    return line + (f" [failed: {fails}]" if fails else "")


class _Chooser:
    """Picks a mismatched image for one question at a time; holds the index and how often images were used."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], rng: np.random.Generator, *, max_referent_share: float,
                 max_image_uses: int, tries: int) -> None:  # fmt: skip
        self.images = _index(rows)
        self.rng, self.share, self.max_uses, self.tries = rng, max_referent_share, max_image_uses, tries
        self.uses: Counter[str] = Counter()
        self.pools: dict[str, list[str]] = {}
        self.by_term: dict[str, set[str]] = {}
        self.proved: dict[str, set[str]] = {}
        self._pool_mentions: dict[frozenset[str], Counter[str]] = {}
        for key in sorted(self.images):
            image = self.images[key]
            self.pools.setdefault(image.row[DATASET], []).append(key)
            for v in image.mentions:
                self.by_term.setdefault(v, set()).add(key)
            for proof in image.proofs:
                for v in {v for p in proof for v in variants(p)}:
                    self.proved.setdefault(v, set()).add(key)

    def _mentioning_all(self, terms: frozenset[str]) -> Counter[str]:
        """Per pool, how many images mention every referent word (cached: many questions share a referent)."""
        if terms not in self._pool_mentions:
            sets = [set().union(*(self.by_term.get(v, set()) for v in variants(t))) for t in terms]
            keys = set.intersection(*sets) if sets else set()
            self._pool_mentions[terms] = Counter(self.images[k].row[DATASET] for k in keys)
        return self._pool_mentions[terms]

    def _free(self, key: str, own: str) -> bool:
        return key != own and self.uses[key] < self.max_uses

    def _draws(self, pools: list[list[str]]) -> list[str]:
        """Up to `tries` random images of the pools together (all of them, shuffled, when fewer), without
        building their union: pools can hold millions of images."""
        sizes = np.cumsum([len(p) for p in pools])
        total = int(sizes[-1]) if len(sizes) else 0
        picks = (
            self.rng.permutation(total) if total <= self.tries else self.rng.integers(total, size=self.tries)
        )
        out = []
        for i in picks:
            j = int(np.searchsorted(sizes, i, side="right"))
            out.append(pools[j][int(i) - (int(sizes[j - 1]) if j else 0)])
        return out

    def choose(self, row: Mapping[str, Any], terms: frozenset[str]) -> tuple[str | None, str]:
        """(image key, how: "proof" | "rare pool") or (None, why no image was found)."""
        own = image_key(row)
        answers = [set(words(a)) for a in sorted(set(normalised(row[ANSWERS] or [])))]
        proved = sorted({k for t in terms for v in variants(t) for k in self.proved.get(v, ())})
        proved = [
            k
            for k in proved
            if self._free(k, own)
            and any(_covers(p, terms) for p in self.images[k].proofs)
            and _acceptable(self.images[k], terms, answers)
        ]
        if proved:
            return proved[int(self.rng.integers(len(proved)))], "proof"
        seen = self._mentioning_all(terms).copy()
        if own in self.images and all(_mentions(self.images[own], t) for t in terms):
            seen[self.images[own].row[DATASET]] -= 1  # the question's own image does not count
        rare = [n for n, keys in self.pools.items() if (seen[n] + 1) / (len(keys) + 1) <= self.share]
        if not rare:
            return None, "referent common in every pool, no proof of absence"
        for own_pool in (False, True):  # other data sets (image sources) first
            pools = [self.pools[n] for n in sorted(rare) if (n == row[DATASET]) == own_pool]
            for key in self._draws(pools):
                if self._free(key, own) and _acceptable(self.images[key], terms, answers):
                    return key, "rare pool"
        return None, f"no acceptable image in {self.tries} draws"


def build_mismatches(
    rows: Sequence[Mapping[str, Any]],
    ratio: float,
    *,
    seed: int = 0,
    max_referent_share: float = 0.05,
    max_image_uses: int = 2,
    tries: int = 64,
) -> MismatchResult:
    """`round(n_answerable_train * ratio)` mismatched unanswerable rows from `items` rows (the recipe above).

    Deterministic: the same rows in the same order with the same arguments give the same result.
    """
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    answerable = [r for r in rows if r[SPLIT] == "train" and r[ANSWERABLE]]
    wanted = round(len(answerable) * ratio)
    reasons = [exclusion_reason(r) for r in answerable]
    eligible = [r for r, why in zip(answerable, reasons, strict=True) if why is None]
    excluded = Counter(f"excluded: {why}" for why in reasons if why is not None)
    failed: Counter[str] = Counter()
    how_built: Counter[str] = Counter()
    built: list[dict[str, Any]] = []
    if wanted:
        rng = np.random.default_rng(seed)
        chooser = _Chooser(answerable, rng, max_referent_share=max_referent_share,
                           max_image_uses=max_image_uses, tries=tries)  # fmt: skip
        for i in rng.permutation(len(eligible)):
            if len(built) == wanted:
                break
            row = eligible[int(i)]
            key, how = chooser.choose(row, referent_terms(row[QUESTION]))
            if key is None:
                failed[f"failed: {how}"] += 1
                continue
            chooser.uses[key] += 1
            how_built[how] += 1
            built.append(mismatched_row(row, chooser.images[key].row, how))
    counts = {
        "answerable": len(answerable),
        "wanted": wanted,
        "eligible": len(eligible),
        "built": len(built),
        "built_by_proof": how_built["proof"],
        "built_by_rare_pool": how_built["rare pool"],
        "short": wanted - len(built),
        **dict(sorted(excluded.items())),
        **dict(sorted(failed.items())),
    }
    return MismatchResult(built, counts)


def mismatched_row(question: Mapping[str, Any], image: Mapping[str, Any], how: str) -> dict[str, Any]:
    """The unanswerable `items` row: `question`'s text on `image`'s picture (bytes or path as stored);
    `how` the image was chosen ("proof" or "rare pool") stays in `source` for whoever audits the row."""
    return {
        ID: f"mismatch:{question[ID]}@{image[ID]}",
        DATASET: f"{question[DATASET]}{SUFFIX}",
        SPLIT: "train",
        IMAGE: image[IMAGE],
        IMAGE_PATH: image[IMAGE_PATH],
        QUESTION: question[QUESTION],
        ANSWERS: [],
        CHOICES: None,
        METRIC: "exact",
        ANSWERABLE: False,
        CATEGORY: "unanswerable",
        SOURCE: f"mismatch by {how}: question {question[ID]} on the image of {image[ID]}",
    }
