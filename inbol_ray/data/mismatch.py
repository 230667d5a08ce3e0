"""Unanswerable training items from answerable ones: a training question put on another training image.

Why: InBoL's extrinsic boundary needs training items that nobody can answer from the picture, and the
paper's training sets (VQAv2, ScienceQA, OVEN) hold none. Pairing a question with an image that lacks
what the question asks about makes one. Only the items' text (and, where configured, COCO's instance
annotations) is known here (no vision model runs in prepare), so every rule below trades eligible questions
for precision: a wrongly "unanswerable" row teaches the model to refuse a question it should answer, which
is worse than building fewer rows.

The recipe, each rule with its reason:

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
3. Pools, own first: a pool is one data set's images. A question goes onto an image of its own data set
   (a VQAv2 question on another COCO image) and only when its own pool has no acceptable image onto
   another data set's: a row whose picture comes from another source or domain would let the model learn
   "the domain changed" instead of "the referent is absent". `counts["cross_dataset"]` says how many
   rows had to cross.
4. Evidence of absence, strongest first, within a pool:
   a. proof: an image whose own item proves the referent absent (a counting question answered 0, or "Is
      there a ...?" answered no, whose words are all among the referent's). These items are proofs, not
      mentions.
   b. instances: with `DatasetSpec.instances` (COCO's `instances_<split>.json`), a referent word that
      names a COCO category (`inbol_ray.data.coco_categories`: "the man" -> person, "the buses" -> bus)
      makes the category's boxes the evidence: on that data set's images the question only goes onto an
      image whose annotations have no box of any such category (an image missing from the file is never
      chosen for it). Annotators boxed every instance of the 80 categories, so this holds for common
      things too, where not being mentioned proves little. Referent words that name no category still
      follow rule c on their own ("the train station": no train box, and "station" rare in the pool).
   c. rare pool: otherwise the image comes from a pool in which the referent is rare: not mentioning a
      word is weak evidence for common things (most photos show a person whether or not a question says
      so), strong evidence for rare ones. A pool qualifies when the share of its images that mention all
      the referent's words, (m + 1) / (n + 1), is at most `max_referent_share` (add-one: a pool of ten
      images never claims anything is rarer than one in eleven). A question whose referent is common in
      every pool and has no proof image is not built.
5. The new row: id `mismatch:<question id>@<image row id>`, data set `<question's data set>_mismatch`,
   split `train`, the question's text, the image's bytes or path (so prepare's image check treats it as
   any row), answers [], no choices, metric `exact`, answerable false, category `unanswerable`, source
   naming both rows and how the image was chosen. Each question is used at most once, each image at most
   `max_image_uses` times.

`round(n_answerable * ratio)` rows are wanted; eligible questions are tried in a seeded random order until
that many are built. Fewer is never silent: `counts` says how many were wanted and built, why each tried
question failed and why each excluded row was excluded; `check_fill` fails prepare when fewer than
`data.mismatch_min_fill` of the wanted rows were built.

Scale (OVEN has ~5M training rows): nothing here holds every answerable row. The rows are split into shards
by a hash of their image (`shard_rows` answerable rows per shard on average; one shard below that), and a
shard's questions only go onto the shard's images, which form a uniform random sample of every pool, so
rarity is measured on that sample (a pool needs 19 images in a shard before the add-one share can reach
0.05; shards are processed in order and each one's target includes what earlier ones fell short of).
`mismatch_staged.plan_staged` (what prepare runs) counts the answerable rows, reads the staged rows once
keeping per row only what selection needs (position, id, data set, image hash, referent words, answers, the
row's own words, COCO category ids) in Parquet runs grouped by shard, then builds shard by shard holding one
shard's compact index (`mismatch_index.ShardIndex`: words as integer ids in numpy arrays, ~0.3 KB per row)
and writes each shard's chosen (question, image row) pairs; `fill_staged` streams the staged rows once more
for the chosen images' bytes or paths. The driver's peak is one shard, whatever the data set's size
(benchmarks/prepare_memory.py: 1M rows within 1.25x of 10k). `build_mismatches` runs the same selection on
rows in memory (tests, small exports): the same rows and arguments give the same pairs either way.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from inbol_ray.data import io as dio
from inbol_ray.data.coco_categories import CocoInstances, image_id_from_path
from inbol_ray.data.mismatch_index import HOW, RECORD, SEQ, Pair, ShardIndex
from inbol_ray.data.referents import absence_proof, exclusion_reason, normalised, referent_terms, words
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
SHARD_ROWS = 25_000
"""Answerable training rows per shard (on average): the most the selection holds at a time. Small enough
that a shard's index stays ~10-20 MB, large enough that a shard's sample of each pool measures rarity and
finds same-pool images (the 7B config's ~76k training rows: 4 shards of ~12k VQAv2 rows each; all 443k
VQAv2 rows among 5M OVEN rows: ~2k per shard). Smaller shards find fewer proof images per referent."""

# --- which images ---------------------------------------------------------------------------------------


def image_key(row: Mapping[str, Any]) -> str:
    """One key per distinct image: its path, or a digest of embedded bytes (MMMU/MMBench-style rows)."""
    if row[IMAGE_PATH]:
        return f"path:{row[IMAGE_PATH]}"
    return "sha1:" + hashlib.sha1(bytes(row[IMAGE] or b"")).hexdigest()


def image_hash(row: Mapping[str, Any], root: str = "") -> int:
    """`image_key` as 64 stable bits: what shards and orders images. A path is hashed below `root` (the
    folder that holds every data set's images, `common_image_root`), so the same data under another folder
    or on another machine gives the same shards, order and pairs."""
    key = image_key(row)
    if root and row[IMAGE_PATH] and row[IMAGE_PATH].startswith(root.rstrip("/") + "/"):
        key = "file:" + row[IMAGE_PATH][len(root.rstrip("/")) + 1 :]
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def common_image_root(locations: Iterable[str | None]) -> str:
    """The deepest folder above every data set's `images` location ("" when they share none): the part of
    an image path that says where the data lives, not which image it is."""
    found = [dio.absolute(loc).rstrip("/") for loc in locations if loc]
    if not found:
        return ""
    parts = [loc.split("/") for loc in found]
    common: list[str] = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    root = "/".join(common)
    return "" if root in ("", "s3:", "gs:", "s3:/", "gs:/") else root


def shard_count(answerable: int, shard_rows: int = SHARD_ROWS) -> int:
    """How many shards `answerable` rows are split into (a row's shard: `image_hash % shard_count`)."""
    return max(1, -(-answerable // max(1, shard_rows)))


# --- compact rows (what selection needs of each answerable training row) --------------------------------


def compact_records(
    rows: Iterable[Mapping[str, Any]],
    seqs: Iterable[int],
    n_shards: int,
    instances: Mapping[str, CocoInstances],
    image_root: str = "",
) -> pa.Table:
    """The compact rows (`RECORD`) of answerable training rows, `seqs` their input positions."""
    cols: dict[str, list[Any]] = {name: [] for name in RECORD.names}
    for row, seq in zip(rows, seqs, strict=True):
        key = image_hash(row, image_root)
        why = exclusion_reason(row)
        proof = absence_proof(row)
        text = " ".join([row[QUESTION], *(row[ANSWERS] or []), *(row[CHOICES] or [])])
        found = instances.get(row[DATASET])
        cats = found.categories(image_id_from_path(row[IMAGE_PATH])) if found is not None else None
        for name, value in (
            (SEQ, seq),
            (ID, row[ID]),
            (DATASET, row[DATASET]),
            ("key", key),
            ("shard", key % n_shards),
            (QUESTION, row[QUESTION] if why is None else None),
            ("why", why),
            ("terms", sorted(referent_terms(row[QUESTION])) if why is None else None),
            (ANSWERS, sorted(set(normalised(row[ANSWERS] or []))) if why is None else None),
            ("mentions", [] if proof else sorted(set(words(text)))),
            ("proof", sorted(proof) if proof else None),
            ("cats", sorted(cats) if cats is not None else None),
        ):
            cols[name].append(value)
    return pa.table(cols, schema=RECORD)


# --- results ----------------------------------------------------------------------------------------------


@dataclass
class MismatchResult:
    rows: list[dict[str, Any]]
    """The new `items` rows, in the order they were built."""
    counts: dict[str, int]
    """`answerable`, `wanted`, `eligible`, `built`, `built_by_proof`, `built_by_instances`,
    `built_by_rare_pool`, `cross_dataset` (built rows whose image is another data set's), `short`
    (wanted - built), `shards`; with instances configured `instances_images` / `instances_images_missing`
    (images of those data sets found / not found in their file); then `excluded: <reason>` per excluded
    question and `failed: <reason>` per tried question that found no image (only reasons that occurred)."""


class MismatchShortfall(RuntimeError):
    """The recipe built fewer rows than `data.mismatch_min_fill` of its target (`check_fill`)."""


def summary(counts: Mapping[str, int]) -> str:
    """One line for logs: what was wanted, what was built, how many crossed data sets, why any fell short."""
    fails = "; ".join(f"{k[len('failed: ') :]}: {v}" for k, v in counts.items() if k.startswith("failed: "))
    built = counts["built"]
    line = (
        f"mismatch built {built} of {counts['wanted']} wanted ({counts['short']} short, "
        f"{counts['eligible']} of {counts['answerable']} answerable questions eligible"
    )
    if "cross_dataset" in counts:  # manifests written before own-pool-first have no such count
        cross = counts["cross_dataset"]
        line += f"; {cross} cross-data-set ({cross / built if built else 0:.1%})"
        line += f", {counts['built_by_instances']} by COCO instances"
    return line + ")" + (f" [failed: {fails}]" if fails else "")


def check_fill(counts: Mapping[str, int], min_fill: float, datasets: Sequence[str], ratio: float) -> None:
    """Raise `MismatchShortfall` when fewer than `min_fill` x wanted rows were built, naming the data sets,
    the target, what was built and why candidates ran out; a smaller shortfall stays in `counts`."""
    wanted, built = counts["wanted"], counts["built"]
    if not wanted or built >= min_fill * wanted:
        return
    excluded = {k[len("excluded: ") :]: v for k, v in counts.items() if k.startswith("excluded: ")}
    failed = {k[len("failed: ") :]: v for k, v in counts.items() if k.startswith("failed: ")}

    def listed(found: Mapping[str, int]) -> str:
        return "; ".join(f"{k} {v:,}" for k, v in sorted(found.items(), key=lambda kv: -kv[1])) or "none"

    why = [
        f"{sum(excluded.values()):,} of {counts['answerable']:,} answerable questions cannot be mismatched "
        f"({listed(excluded)})",
        f"{counts['eligible']:,} eligible questions were tried, {sum(failed.values()):,} found no image "
        f"({listed(failed)})",
    ]
    if counts["eligible"] < wanted:
        why.append(f"only {counts['eligible']:,} questions are eligible for {wanted:,} wanted rows")
    raise MismatchShortfall(
        f"data.unanswerable_per_answerable={ratio} asks for {wanted:,} mismatched unanswerable rows from the "
        f"training data sets {', '.join(datasets)} ({counts['answerable']:,} answerable rows), but the "
        f"recipe built {built:,} ({built / wanted:.1%}, below data.mismatch_min_fill={min_fill}). Why "
        f"candidates ran out: {'; '.join(why)}. Lower data.unanswerable_per_answerable, raise "
        f"data.mismatch_max_referent_share or data.mismatch_max_image_uses, give COCO data sets their "
        f"`instances:` file, or lower data.mismatch_min_fill."
    )


class Tally:
    """Counts over every shard; `quota` carries a shard's shortfall over to the shards after it."""

    def __init__(self, answerable: int, ratio: float, instance_pools: Iterable[str]) -> None:
        self.answerable, self.ratio = answerable, ratio
        self.wanted = round(answerable * ratio)
        self.instance_pools = frozenset(instance_pools)
        self.seen = self.built = self.cross = self.eligible = 0
        self.how: Counter[str] = Counter()
        self.excluded: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.instances: Counter[str] = Counter()

    def quota(self, shard_rows: int) -> int:
        """Rows the next shard should build: its share of the target plus what earlier shards missed."""
        self.seen += shard_rows
        return max(0, round(self.seen * self.ratio) - self.built)

    def counts(self, n_shards: int) -> dict[str, int]:
        out = {
            "answerable": self.answerable,
            "wanted": self.wanted,
            "eligible": self.eligible,
            "built": self.built,
            **{f"built_by_{how.replace(' ', '_')}": self.how[how] for how in HOW},
            "cross_dataset": self.cross,
            "short": self.wanted - self.built,
            "shards": n_shards,
        }
        if self.instance_pools:
            out["instances_images"] = self.instances["found"]
            out["instances_images_missing"] = self.instances["missing"]
        return {
            **out,
            **dict(sorted((f"excluded: {k}", v) for k, v in self.excluded.items())),
            **dict(sorted((f"failed: {k}", v) for k, v in self.failed.items())),
        }

    def see_records(self, table: pa.Table) -> None:
        """Pass-1 counts: eligible questions and exclusion reasons."""
        why = table["why"]
        self.eligible += why.null_count
        if len(why) > why.null_count:
            for entry in pc.value_counts(why.drop_null()).to_pylist():
                self.excluded[entry["values"]] += entry["counts"]


# --- building ---------------------------------------------------------------------------------------------


def build_shard(table: pa.Table, shard: int, tally: Tally, *, seed: int, **kw: Any) -> list[Pair]:
    """Build one shard's rows (its quota: its share of the target plus what earlier shards fell short of);
    counts go to `tally`."""
    quota = tally.quota(table.num_rows)
    index = ShardIndex(table, np.random.default_rng([seed, shard]), instance_pools=tally.instance_pools, **kw)
    tally.instances.update(index.instance_counts())
    built = index.build(quota)
    tally.failed.update(index.failed)
    tally.how.update(index.how)
    tally.cross += index.cross
    tally.built += len(built)
    return built


def build_mismatches(
    rows: Sequence[Mapping[str, Any]],
    ratio: float,
    *,
    seed: int = 0,
    max_referent_share: float = 0.05,
    max_image_uses: int = 2,
    tries: int = 64,
    instances: Mapping[str, CocoInstances] | None = None,
    shard_rows: int = SHARD_ROWS,
    image_root: str = "",
) -> MismatchResult:
    """`round(n_answerable_train * ratio)` mismatched unanswerable rows from `items` rows (the recipe above),
    all in memory; `instances`: COCO instance annotations per data set name.

    Deterministic: the same rows in the same order with the same arguments give the same result, and the
    same pairs as `mismatch_staged.plan_staged` on those rows staged.
    """
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    instances = dict(instances or {})
    positions = [i for i, r in enumerate(rows) if r[SPLIT] == "train" and r[ANSWERABLE]]
    n_shards = shard_count(len(positions), shard_rows)
    records = compact_records((rows[i] for i in positions), positions, n_shards, instances, image_root)
    tally = Tally(len(positions), ratio, instances)
    tally.see_records(records)
    built: list[dict[str, Any]] = []
    for shard in range(n_shards):
        table = records.filter(pc.equal(records["shard"], shard))
        for b in build_shard(table, shard, tally, seed=seed, max_referent_share=max_referent_share,
                             max_image_uses=max_image_uses, tries=tries):  # fmt: skip
            built.append(mismatched_row(_question_row(b), rows[b.image_seq], b.how))
    return MismatchResult(built, tally.counts(n_shards))


def _question_row(b: Pair) -> dict[str, Any]:
    return {ID: b.id, DATASET: b.dataset, QUESTION: b.question}


def mismatched_row(question: Mapping[str, Any], image: Mapping[str, Any], how: str) -> dict[str, Any]:
    """The unanswerable `items` row: `question`'s text on `image`'s picture (bytes or path as stored);
    `how` the image was chosen ("proof", "instances" or "rare pool") stays in `source` for whoever audits
    the row."""
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
