"""`sample_rows`: a seeded random subset chosen while rows stream, instead of a file's head (issue 30)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from inbol_ray.config import Config, DataConfig, DatasetSpec
from inbol_ray.data.loaders import load, load_streaming
from inbol_ray.data.loaders.sampling import RowSample
from inbol_ray.data.prepare import _counts, read_sources
from inbol_ray.schema import CATEGORY, DATASET, ID


def _rows(n: int, dataset: str = "d") -> list[dict]:
    return [
        {ID: f"{dataset}:{i}", DATASET: dataset, CATEGORY: "head" if i < n // 2 else "tail"} for i in range(n)
    ]


def _sample(rows: list[dict], k: int, seed: int = 0, chunk: int = 7) -> tuple[list[dict], RowSample]:
    sample = RowSample(k, seed)
    for start in range(0, len(rows), chunk):
        sample.add(rows[start : start + chunk])
    return [row for part in sample.chunks(5) for row in part], sample


def test_the_subset_depends_on_seed_and_ids_only() -> None:
    rows = _rows(1000)
    kept, sample = _sample(rows, 100)
    assert len(kept) == 100 and sum(sample.dropped.values()) == 900
    assert [r[ID] for r in kept] == sorted(
        (r[ID] for r in kept), key=lambda i: int(i.split(":")[1])
    )  # input order
    assert [r[ID] for r in _sample(rows, 100, chunk=1000)[0]] == [r[ID] for r in kept]  # chunking
    shuffled, _ = _sample(rows[::-1], 100)  # the file's order does not choose the rows
    assert {r[ID] for r in shuffled} == {r[ID] for r in kept}
    assert {r[ID] for r in _sample(rows, 100, seed=1)[0]} != {r[ID] for r in kept}
    assert {r[ID] for r in kept} <= {r[ID] for r in _sample(rows, 200)[0]}  # growing k keeps the subset


def test_the_subset_is_not_the_head() -> None:
    """A file sorted by category: its head is all one category, the subset about half of each."""
    kept, _ = _sample(_rows(4000), 400)
    share = Counter(r[CATEGORY] for r in kept)["head"] / 400
    assert 0.4 < share < 0.6, share


def test_fewer_rows_than_asked_keeps_them_all() -> None:
    kept, sample = _sample(_rows(10), 50)
    assert [r[ID] for r in kept] == [r[ID] for r in _rows(10)] and not sample.dropped


def _oven(path: Path, n: int) -> str:
    lines = [
        {"data_id": f"oven_{i:05d}", "image_id": f"oven_{i:05d}", "question": "what is this?",
         "entity_id": f"Q{i}", "entity_text": f"entity {i}", "data_split": "train"}
        for i in range(n)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_loaders_apply_it_after_limit_and_count_what_they_leave_out(tmp_path: Path) -> None:
    path = _oven(tmp_path / "oven_entity_train.jsonl", 300)
    spec = DatasetSpec(name="oven", format="oven", path=path, images=str(tmp_path), sample_rows=40)
    items: list[dict] = []
    dropped: Counter[str] = Counter()
    read = load_streaming(
        spec, items.extend, lambda rows: None, chunk_rows=16, sample_seed=3, not_sampled=dropped
    )
    assert read == 300 and len(items) == 40 and dropped == {"oven": 260}
    assert [r[ID] for r in load(spec, sample_seed=3).items] == [r[ID] for r in items]
    assert [r[ID] for r in load(spec, sample_seed=4).items] != [r[ID] for r in items]
    head = DatasetSpec(name="oven", format="oven", path=path, images=str(tmp_path), limit=100, sample_rows=40)
    assert all(int(r[ID].split("_")[-1]) < 100 for r in load(head).items)  # a subset of the head


def test_prepare_accounts_for_rows_left_out(tmp_path: Path) -> None:
    path = _oven(tmp_path / "oven_entity_train.jsonl", 120)
    spec = DatasetSpec(name="oven", format="oven", path=path, images=str(tmp_path), sample_rows=30)
    cfg = Config(run_dir=str(tmp_path / "run"), data=DataConfig(source="files", datasets=[spec]))
    sources = read_sources(cfg)
    assert sources.items.num_rows == 30
    assert sources.read == {"oven": 120} and sources.not_sampled == {"oven": 90}
    counts = _counts(sources.read, Counter({"oven": 2}), Counter({"oven": 28}), sources.not_sampled)
    assert counts == {"oven": {"read": 120, "items": 28, "quarantined": 2, "not_sampled": 90}}
