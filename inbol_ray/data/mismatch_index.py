"""One shard of the mismatch recipe (`inbol_ray.data.mismatch`): a compact index of the shard's images and
the chooser that puts the shard's questions on them.

Why a module of its own: the rules of the recipe are in `inbol_ray.data.mismatch` (and the text rules in
`inbol_ray.data.referents`); this is the data structure that applies them within the memory a shard may
take, whatever the size of the data set: words as integer ids in numpy arrays, no Python object per word.
It reads the compact rows (`RECORD`) that `mismatch.compact_records` makes of `items` rows.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from inbol_ray.data.coco_categories import categories_of
from inbol_ray.data.referents import variants, words
from inbol_ray.schema import ANSWERS, DATASET, ID, QUESTION

HOW = ("proof", "instances", "rare pool")
"""How an image was chosen (`source` says it; counted as `built_by_<how>`)."""

SEQ = "seq"
"""Compact rows' input position (the staged `_seq`, or the index into the rows in memory)."""
RECORD = pa.schema(
    [
        (SEQ, pa.int64()),  # the row's position in input order (its staged `_seq`)
        (ID, pa.string()),
        (DATASET, pa.string()),
        ("key", pa.uint64()),  # image_hash
        ("shard", pa.int32()),
        (QUESTION, pa.string()),  # eligible questions only
        ("why", pa.string()),  # exclusion_reason; null: eligible
        ("terms", pa.list_(pa.string())),  # referent_terms (eligible only)
        (ANSWERS, pa.list_(pa.string())),  # distinct normalised gold answers (eligible only)
        ("mentions", pa.list_(pa.string())),  # the row's own words (empty for a proof row)
        ("proof", pa.list_(pa.string())),  # absence_proof words, null when none
        ("cats", pa.list_(pa.int16())),  # COCO categories boxed on the image; null: no instances evidence
    ]
)
"""What selection needs of each answerable training row (a few hundred bytes, no image)."""


@dataclass
class Pair:
    """One chosen pair: the question row's fields and the image row's id and position."""

    id: str
    dataset: str
    question: str
    image_id: str
    image_seq: int
    how: str


@dataclass
class Question:
    """An eligible question as the chooser sees it: its image (index), referent words, the words of each
    gold answer, the COCO categories its referent names and the referent words that name none."""

    id: str
    dataset: str
    text: str
    image: int
    terms: frozenset[str]
    answers: list[set[str]] = field(default_factory=list)
    cats: frozenset[int] = frozenset()
    unmapped: frozenset[str] = frozenset()


def covers(proof: frozenset[str], terms: frozenset[str]) -> bool:
    """A proof covers a referent when each proved-absent word is one of the referent's words."""
    return all(any(variants(p) & variants(t) for t in terms) for p in proof)


class ShardIndex:
    """A shard's compact image index and the chooser over it. Images by dense index in image-hash order,
    as numpy arrays: their first row (position, and row index for the id), pool, COCO categories; their
    words as ids of a shard vocabulary in two CSR layouts (image -> sorted word ids, for "does it mention";
    word -> images, for the rarity counts); proofs (few) in dicts. ~0.3 KB per row."""

    def __init__(self, table: pa.Table, rng: np.random.Generator, *, max_referent_share: float,
                 max_image_uses: int, tries: int, instance_pools: frozenset[str]) -> None:  # fmt: skip
        self.rng, self.share, self.max_uses, self.tries = rng, max_referent_share, max_image_uses, tries
        self.instance_pools = instance_pools
        self.table = table  # rows in input order
        _, first, inverse = np.unique(table["key"].to_numpy(), return_index=True, return_inverse=True)
        self.first = first  # the image's first row (lowest position): its id stands for the image
        self.image_of_row = inverse.astype(np.int32).ravel()
        n_images = len(first)
        self.pool_names = sorted(pc.unique(table[DATASET]).to_pylist())
        pool_of_row = pc.index_in(table[DATASET], value_set=pa.array(self.pool_names, pa.string()))
        self.pool_of = pool_of_row.to_numpy().astype(np.int32)[first]
        self.pools = {name: np.flatnonzero(self.pool_of == i) for i, name in enumerate(self.pool_names)}
        shared: dict[frozenset[int], frozenset[int]] = {}
        cats_of_row = table["cats"].take(pa.array(first)).to_pylist() if n_images else []
        self.cats: list[frozenset[int] | None] = [
            None if c is None else shared.setdefault(frozenset(c), frozenset(c)) for c in cats_of_row
        ]
        self.vocab: dict[str, int] = {}
        self.proofs: dict[int, list[frozenset[str]]] = {}
        self.proved: dict[str, set[int]] = {}
        pair_image, pair_word = array("i"), array("i")
        row = 0
        for batch in table.select(["mentions", "proof"]).to_batches(max_chunksize=4096):
            for mentions, proof in zip(
                batch["mentions"].to_pylist(), batch["proof"].to_pylist(), strict=True
            ):
                image = int(self.image_of_row[row])
                row += 1
                if proof is not None:
                    proof = frozenset(proof)
                    self.proofs.setdefault(image, []).append(proof)
                    for v in {v for p in proof for v in variants(p)}:
                        self.proved.setdefault(v, set()).add(image)
                    continue
                for w in mentions:
                    for v in variants(w):
                        pair_image.append(image)
                        pair_word.append(self.vocab.setdefault(v, len(self.vocab)))
        pairs = np.unique(
            (np.frombuffer(pair_image, np.int32).astype(np.int64) << 32) | np.frombuffer(pair_word, np.int32)
        )
        del pair_image, pair_word
        images, word_ids = (pairs >> 32).astype(np.int32), (pairs & 0xFFFFFFFF).astype(np.int32)
        del pairs
        self.word_start = np.searchsorted(images, np.arange(n_images + 1)).tolist()
        self.words = array("i", word_ids.tobytes())  # image i's sorted word ids: words[word_start[i]:...]
        by_word = np.argsort(word_ids, kind="stable")  # images stay sorted within a word
        self.posting_start = np.searchsorted(word_ids[by_word], np.arange(len(self.vocab) + 1))
        self.postings = images[by_word]  # word w's images: postings[posting_start[w]:...]
        self.uses = np.zeros(n_images, np.int32)
        self.failed: Counter[str] = Counter()  # why tried questions found no image
        self.how: Counter[str] = Counter()  # how the built ones found theirs
        self.cross = 0  # built rows whose image is another data set's
        self._pool_mentions: dict[frozenset[str], Counter[str]] = {}

    def image_id(self, image: int) -> str:
        return self.table[ID][int(self.first[image])].as_py()

    def image_seq(self, image: int) -> int:
        return self.table[SEQ][int(self.first[image])].as_py()

    def instance_counts(self) -> Counter[str]:
        """Images of data sets with instances found / not found in their file."""
        out: Counter[str] = Counter()
        for image, pool in enumerate(self.pool_of):
            if self.pool_names[pool] in self.instance_pools:
                out["found" if self.cats[image] is not None else "missing"] += 1
        return out

    # --- tests of one image

    def _mentions(self, image: int, word: str) -> bool:
        lo, hi = self.word_start[image], self.word_start[image + 1]
        for v in variants(word):
            wid = self.vocab.get(v)
            if wid is not None:
                i = bisect_left(self.words, wid, lo, hi)
                if i < hi and self.words[i] == wid:
                    return True
        return False

    def _acceptable(self, image: int, terms: frozenset[str], answers: list[set[str]]) -> bool:
        if any(self._mentions(image, t) for t in terms):
            return False
        return not any(a and all(self._mentions(image, w) for w in a) for a in answers)

    def _fits(self, image: int, q: Question) -> str | None:
        """How `image` may carry question `q` ("instances" or "rare pool"), or None."""
        if image == q.image or self.uses[image] >= self.max_uses:
            return None
        if not self._acceptable(image, q.terms, q.answers):
            return None
        if q.cats and self.pool_names[self.pool_of[image]] in self.instance_pools:
            cats = self.cats[image]
            return "instances" if cats is not None and not cats & q.cats else None
        return "rare pool"

    # --- pools

    def _mentioning_all(self, terms: frozenset[str]) -> Counter[str]:
        """Per pool, how many images mention every referent word (cached: many questions share a referent)."""
        if terms not in self._pool_mentions:
            images = None
            for t in terms:
                ids = [self.vocab[v] for v in variants(t) if v in self.vocab]
                found = np.unique(
                    np.concatenate(
                        [self.postings[self.posting_start[w] : self.posting_start[w + 1]] for w in ids]
                        or [np.empty(0, np.int32)]
                    )
                )
                images = found if images is None else np.intersect1d(images, found, assume_unique=True)
            found = self.pool_of[images] if images is not None else np.empty(0, np.int32)
            counts = np.bincount(found, minlength=len(self.pool_names))
            self._pool_mentions[terms] = Counter(
                {self.pool_names[i]: int(n) for i, n in enumerate(counts) if n}
            )
        return self._pool_mentions[terms]

    def _rare(self, pool: str, q: Question) -> bool:
        """Whether `pool` may lend `q` an image without a proof: its referent (the words no COCO category
        covers, on a pool with instances) is rare there."""
        need = q.unmapped if q.cats and pool in self.instance_pools else q.terms
        if not need:
            return True
        seen = self._mentioning_all(need)[pool]
        if self.pool_names[self.pool_of[q.image]] == pool and all(self._mentions(q.image, t) for t in need):
            seen -= 1  # the question's own image does not count
        return (seen + 1) / (len(self.pools[pool]) + 1) <= self.share

    def _draws(self, pools: list[array]) -> list[int]:
        """Up to `tries` random images of the pools together (all of them, shuffled, when fewer), without
        building their union."""
        sizes = np.cumsum([len(p) for p in pools])
        total = int(sizes[-1]) if len(sizes) else 0
        picks = (
            self.rng.permutation(total) if total <= self.tries else self.rng.integers(total, size=self.tries)
        )
        out = []
        for i in picks:
            j = int(np.searchsorted(sizes, i, side="right"))
            out.append(int(pools[j][int(i) - (int(sizes[j - 1]) if j else 0)]))
        return out

    def choose(self, q: Question) -> tuple[int | None, str]:
        """(image, how) or (None, why no image was found): own pool first, other pools only after it."""
        proved = sorted({i for t in q.terms for v in variants(t) for i in self.proved.get(v, ())})
        proved = [i for i in proved if any(covers(p, q.terms) for p in self.proofs[i])]
        own = self.pool_names[self.pool_of[q.image]]
        any_pool = False
        for group in ([own], sorted(p for p in self.pools if p != own)):
            members = set(group)
            candidates = [
                i for i in proved if self.pool_names[self.pool_of[i]] in members and self._fits(i, q)
            ]
            if candidates:
                return candidates[int(self.rng.integers(len(candidates)))], "proof"
            rare = [p for p in group if self._rare(p, q)]
            any_pool = any_pool or bool(rare)
            for image in self._draws([self.pools[p] for p in rare]):
                how = self._fits(image, q)
                if how:
                    return image, how
        if not any_pool and not proved:
            return None, "referent common in every pool, no proof of absence"
        return None, f"no acceptable image in {self.tries} draws"

    def build(self, quota: int) -> list[Pair]:
        """Up to `quota` rows: the shard's eligible questions in a seeded random order, each tried once."""
        why = self.table["why"]
        eligible = np.flatnonzero(pc.is_null(why).to_numpy(zero_copy_only=False))
        eligible = eligible[np.argsort(self.table[SEQ].to_numpy()[eligible], kind="stable")]
        built: list[Pair] = []
        if not quota:
            return built
        for r in self.rng.permutation(eligible):
            if len(built) == quota:
                break
            q = self.question(int(r))
            image, how = self.choose(q)
            if image is None:
                self.failed[how] += 1
                continue
            self.uses[image] += 1
            self.how[how] += 1
            self.cross += int(self.pool_of[image] != self.pool_of[q.image])
            built.append(Pair(q.id, q.dataset, q.text, self.image_id(image), self.image_seq(image), how))
        return built

    def question(self, row: int) -> Question:
        t = self.table
        terms = frozenset(t["terms"][row].as_py())
        cats, unmapped = categories_of(terms)
        return Question(
            id=t[ID][row].as_py(),
            dataset=t[DATASET][row].as_py(),
            text=t[QUESTION][row].as_py(),
            image=int(self.image_of_row[row]),
            terms=terms,
            answers=[set(words(a)) for a in t[ANSWERS][row].as_py()],
            cats=cats,
            unmapped=unmapped,
        )
