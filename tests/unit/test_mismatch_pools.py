"""The mismatch recipe's pools and scale (inbol_ray.data.mismatch, mismatch_index, mismatch_staged): own
pool first, COCO instance annotations as absence evidence, the fill limit, the counts, and the sharded
staged path prepare runs (same rows as in memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from inbol_ray.data import io as dio
from inbol_ray.data import mismatch_staged
from inbol_ray.data.coco_categories import CocoInstances
from inbol_ray.data.mismatch import MismatchShortfall, build_mismatches, check_fill, summary
from inbol_ray.data.mismatch_staged import fill_staged, plan_staged
from inbol_ray.schema import DATASET, ID, ITEMS, QUESTION, SOURCE
from tests.unit.mismatch_helpers import by_id, corpus, item, parts


def test_own_pool_first_other_pools_only_when_it_is_exhausted() -> None:
    """Pool a: image a0 carries two eligible questions, a1 one; each image may be used once (and the share
    limit is lifted: a pool of two images can vouch for no rarity). a1's question takes a0; of a0's two
    questions the first tried takes a1 and the second finds its own pool exhausted (only its own image is
    left) and crosses into pool b, counted; b's rows are yes/no (not eligible)."""
    rows = [
        item("a:0k", "a", "a/0.jpg", "What color is the kite0?", ["teal"]),
        item("a:0b", "a", "a/0.jpg", "What is on the bench0?", ["cup"]),
        item("a:1c", "a", "a/1.jpg", "What time is on the clock1?", ["noon"]),
        *(item(f"b:{i}", "b", f"b/{i}.jpg", f"Is there a horse{i}?", ["yes"]) for i in range(20)),
    ]
    for seed in range(6):
        result = build_mismatches(rows, 1.0, seed=seed, max_image_uses=1, max_referent_share=1.0)
        pairs = dict(parts(r) for r in result.rows)
        assert len(pairs) == 3 and pairs["a:1c"] == "a:0k", pairs  # a0's first row stands for the image
        crossed = [q for q, i in pairs.items() if i.startswith("b:")]
        assert len(crossed) == 1 and crossed[0] in ("a:0k", "a:0b")
        assert {pairs["a:0k"], pairs["a:0b"]} - {pairs[crossed[0]]} == {"a:1c"}
        assert result.counts["cross_dataset"] == 1
    # With a second use per image allowed, nothing has to cross.
    assert build_mismatches(rows, 1.0, max_image_uses=2, max_referent_share=1.0).counts["cross_dataset"] == 0


def coco_item(i: int, question: str, answers: list[str]) -> dict[str, Any]:
    return item(f"coco:{i}", "coco", f"/data/coco/train2014/COCO_train2014_{i:012d}.jpg", question, answers)


def instances_of(boxes: dict[int, set[int]]) -> CocoInstances:
    """CocoInstances of images -> category ids boxed (as `read_instances` would return them)."""
    ids = sorted(boxes)
    masks = [sum(1 << c for c in boxes[i]) for i in ids]
    return CocoInstances(
        np.array(ids, np.int64),
        np.array([m & (2**64 - 1) for m in masks], np.uint64),
        np.array([m >> 64 for m in masks], np.uint64),
    )


def test_coco_instances_veto_images_that_show_the_category() -> None:
    """ "the man" names COCO's person: with instances it only goes onto an image with no person box (images
    1-29 have one, 30-38 a dog box only, 39 is missing from the file: no evidence, never chosen); without
    instances any image not mentioning a man would do. The kite questions name no category: text rule."""
    rows = [coco_item(0, "What is the man holding?", ["umbrella"])]
    rows += [coco_item(i, f"What color is the kite{i}?", [f"blue{i}"]) for i in range(1, 40)]
    boxes = {i: {1} for i in range(30)} | {i: {18} for i in range(30, 39)}
    free = {f"coco:{i}" for i in range(30, 39)}
    chosen = set()
    for seed in range(20):
        result = build_mismatches(rows, 1.0, seed=seed, instances={"coco": instances_of(boxes)})
        pairs = dict(parts(r) for r in result.rows)
        assert pairs["coco:0"] in free, pairs["coco:0"]
        chosen.add(pairs["coco:0"])
        man = next(r for r in result.rows if parts(r)[0] == "coco:0")
        assert man[SOURCE].startswith("mismatch by instances:")
        c = result.counts
        assert (c["instances_images"], c["instances_images_missing"]) == (39, 1)
        assert c["built_by_instances"] >= 1 and c["built_by_rare_pool"] >= 30 and c["cross_dataset"] == 0
        # The kite questions (no category) may go onto person images: the veto is per category.
        assert any(pairs[f"coco:{i}"] not in free for i in range(1, 40) if f"coco:{i}" in pairs)
    assert len(chosen) > 3  # a random person-free image, not always the same one
    without = build_mismatches(rows, 1.0, seed=0)
    assert without.counts["built_by_instances"] == 0 and "instances_images" not in without.counts


def test_instances_replace_the_rarity_rule_for_common_categories() -> None:
    """ "the dog" on 30 of 40 images is too common for the text rule alone (no pool is rare for it), but the
    instance annotations prove dogs absent from the 10 images without a dog box."""
    rows = [coco_item(i, "What is the dog doing?", [f"act{i}"]) for i in range(30)]
    rows += [coco_item(i, f"What color is the kite{i}?", [f"blue{i}"]) for i in range(30, 40)]
    text_only = build_mismatches(rows, 0.25)
    assert text_only.counts["failed: referent common in every pool, no proof of absence"] == 30
    boxes = {i: ({18} if i < 30 else set()) for i in range(40)}
    result = build_mismatches(rows, 0.25, instances={"coco": instances_of(boxes)}, max_image_uses=5)
    dogs = [parts(r) for r in result.rows if r[QUESTION] == "What is the dog doing?"]
    assert dogs and all(int(i.split(":")[1]) >= 30 for _, i in dogs)
    assert result.counts["built_by_instances"] == len(dogs)


def test_too_few_rows_fail_prepare_with_the_reasons() -> None:
    result = build_mismatches(corpus(), 1.0)  # 120 wanted, at most 80 eligible
    c = result.counts
    assert 0 < c["built"] < 0.7 * c["wanted"]
    check_fill(c, 0.5, ["coco", "wiki"], 1.0)  # over half built: counted, no error
    with pytest.raises(MismatchShortfall) as failed:
        check_fill(c, 0.7, ["coco", "wiki"], 1.0)
    message = str(failed.value)
    assert "asks for 120 mismatched unanswerable rows from the training data sets coco, wiki" in message
    assert f"built {c['built']} (" in message and "below data.mismatch_min_fill=0.7" in message
    assert "yes/no question 40" in message and "only 80 questions are eligible for 120 wanted rows" in message
    check_fill({**c, "wanted": 0, "built": 0}, 1.0, ["coco"], 0.0)  # nothing wanted: nothing to fill


def test_counts_add_up() -> None:
    rows = corpus()
    result = build_mismatches(rows, 0.5, max_image_uses=1)
    c = result.counts
    source = by_id(rows)
    assert (
        c["built"] == len(result.rows) == sum(c[f"built_by_{h}"] for h in ("proof", "instances", "rare_pool"))
    )
    assert c["cross_dataset"] == sum(
        source[q][DATASET] != source[i][DATASET] for q, i in map(parts, result.rows)
    )
    assert c["short"] == c["wanted"] - c["built"] and c["shards"] == 1
    assert "0 cross-data-set (0.0%), 0 by COCO instances" in summary(c)


def test_shards_bound_the_index_and_staged_rows_match_rows_in_memory(tmp_path: Path, monkeypatch) -> None:
    """Sharded by image hash (4 shards of ~30 rows here), the staged path (compact rows on disk, one shard
    at a time, images filled by a second pass) builds exactly the in-memory path's rows; reruns are equal.
    A shard holds ~10 images per pool, so rarity is measured on that sample: the share limit is raised.
    Read 20 rows at a time into runs of 40 compact rows: each shard is read back from three runs."""
    monkeypatch.setattr(mismatch_staged, "RUN_ROWS", 40)
    runs: list[str] = []
    flush = mismatch_staged._Runs.flush

    def counted(self: mismatch_staged._Runs) -> None:
        flush(self)
        runs[:] = [uri for uri, _ in self.runs]

    monkeypatch.setattr(mismatch_staged._Runs, "flush", counted)
    rows = corpus()
    memory = build_mismatches(rows, 0.25, seed=3, shard_rows=30, max_referent_share=0.2)
    assert memory.counts["shards"] == 4 and memory.counts["built"] == memory.counts["wanted"] == 30
    table = pa.Table.from_pylist(rows, schema=ITEMS)
    table = table.append_column("_seq", pa.array(range(len(rows)), pa.int64()))
    dio.write_table(table.slice(0, 50), str(tmp_path / "items" / "part-1.parquet"))
    dio.write_table(table.slice(50), str(tmp_path / "items" / "part-2.parquet"))

    def staged() -> tuple[dict[str, int], list[dict[str, Any]]]:
        out: list[dict[str, Any]] = []
        plan = plan_staged(str(tmp_path / "items"), str(tmp_path / "work"), 0.25, seq_column="_seq", seed=3,
                           shard_rows=30, max_referent_share=0.2, batch_rows=20)  # fmt: skip
        assert fill_staged(plan, str(tmp_path / "items"), out.extend, seq_column="_seq", chunk_rows=7) == 30
        assert not dio.exists(str(tmp_path / "work"))
        assert len(runs) == 3
        runs.clear()
        return plan.counts, out

    counts, built = staged()
    assert counts == memory.counts
    assert sorted(built, key=lambda r: r[ID]) == sorted(memory.rows, key=lambda r: r[ID])
    assert staged()[1] == built
    assert build_mismatches(rows, 0.25, seed=3, shard_rows=30, max_referent_share=0.2).rows == memory.rows
