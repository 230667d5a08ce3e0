"""The construct stage's join and table writing: every sampled item lands in a table or quarantine."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from inbol_ray import schema as S
from inbol_ray.boundary.tables import build_tables, run_construct
from inbol_ray.config import Config, ConstructConfig, ShapesConfig
from inbol_ray.data import io as dio
from inbol_ray.data.shapes import generate_items
from inbol_ray.model.prompt import render_prompt
from inbol_ray.run_layout import RunLayout


def _items_and_samples() -> tuple[pa.Table, pa.Table]:
    cfg = ShapesConfig(n_pretrain=0, n_train=40, n_id_test=0, n_ood_test=0, n_unanswerable_test=0, seed=3)
    items = generate_items(cfg, 48)
    rows = []
    for i, r in enumerate(items.to_pylist()):
        gold = r[S.ANSWERS][0] if r[S.ANSWERS] else "red"
        pattern = i % 4  # 0: all correct, 1: half, 2: none, 3: all refusals
        responses = {
            0: [gold] * 4,
            1: [gold, gold, "zzz", "zzz"],
            2: ["zzz", "yyy", "zzz", "zzz"],
            3: ["I don't know."] * 4,
        }[pattern]
        correct = [x == gold and r[S.ANSWERABLE] for x in responses]
        refused = [x == "I don't know." for x in responses]
        conf = sum(correct) / 4
        rows.append(
            {
                S.ID: r[S.ID],
                S.PROMPT: render_prompt(r[S.QUESTION], r[S.CHOICES]),
                S.RESPONSES: responses,
                S.CORRECT: correct,
                S.REFUSED: refused,
                S.CONF: conf,
            }
        )
    return items, pa.Table.from_pylist(rows, schema=S.SAMPLES)


def test_every_row_is_accounted_for_and_images_are_attached() -> None:
    items, samples = _items_and_samples()
    built = build_tables(items, samples, ConstructConfig())
    images = dict(zip(items[S.ID].to_pylist(), items[S.IMAGE].to_pylist(), strict=True))
    for name, (table, quarantine, counts) in built.items():
        assert table.num_rows + quarantine.num_rows == samples.num_rows, name
        assert counts["output"] == table.num_rows
        assert all(
            images[i] == b for i, b in zip(table[S.ID].to_pylist(), table[S.IMAGE].to_pylist(), strict=True)
        )
    idk = built["idk_it"][0].to_pylist()
    kinds = {r[S.TARGET_KIND] for r in idk}
    assert kinds == {"answer", "refusal"}
    sft = built["sft_baseline"][0].to_pylist()
    answerable = dict(zip(items[S.ID].to_pylist(), items[S.ANSWERABLE].to_pylist(), strict=True))
    assert all((r[S.TARGET_KIND] == "refusal") == (not answerable[r[S.ID]]) for r in sft)
    # all-refusal samples of an answerable item have no incorrect answer to pair with: quarantined
    assert built["cadpo_pairs"][1].num_rows > 0
    sampled_with = dict(zip(samples[S.ID].to_pylist(), samples[S.PROMPT].to_pylist(), strict=True))
    for name, (table, _, _) in built.items():  # every table trains on the prompt the samples were drawn with
        assert all(sampled_with[r[S.ID]] == r[S.PROMPT] for r in table.to_pylist()), name


def test_sample_without_item_fails_loudly() -> None:
    items, samples = _items_and_samples()
    with pytest.raises(ValueError, match="have no item"):
        build_tables(items.slice(1), samples, ConstructConfig())


def test_run_construct_writes_tables_and_quarantine(tmp_path: Path) -> None:
    items, samples = _items_and_samples()
    dio.write_table(items, str(tmp_path / "items" / "a.parquet"))
    dio.write_table(samples, str(tmp_path / "samples" / "a.parquet"))
    result = run_construct(Config(), RunLayout(str(tmp_path)))
    for name, uri in result.uris.items():
        table = dio.read_table(uri)
        assert table.num_rows == result.counts[name]["output"]
    q = dio.read_quarantine(str(tmp_path))
    assert q.num_rows == sum(c["quarantined"] for c in result.counts.values())
    assert "construct" in result.summary_line()


def _written(root: Path, result) -> dict[str, tuple]:
    quarantine = dio.read_quarantine(str(root)).sort_by([(S.ROW_KEY, "ascending"), (S.STAGE, "ascending")])
    return {
        "tables": {name: dio.read_table(uri) for name, uri in result.uris.items()},
        "counts": result.counts,
        "quarantine": quarantine,
    }


def test_id_ranges_build_the_same_tables_as_one_window(tmp_path: Path) -> None:
    """Samples beyond construct.window_rows are cut into id ranges built one at a time (bounded memory):
    the tables, counts and quarantine are the same as with everything in one window, and in id order."""
    items, samples = _items_and_samples()
    outputs = {}
    for window in (100_000, 7):
        root = tmp_path / f"w{window}"
        for i, start in enumerate(range(0, items.num_rows, 9)):  # several files, in no id order
            dio.write_table(items.slice(start, 9), str(root / "items" / f"{9 - i}.parquet"))
        dio.write_table(
            samples.take(list(range(samples.num_rows))[::-1]), str(root / "samples" / "a.parquet")
        )
        cfg = Config()
        cfg.construct.window_rows = window
        outputs[window] = _written(root, run_construct(cfg, RunLayout(str(root))))
    one, ranges = outputs[100_000], outputs[7]
    assert ranges["counts"] == one["counts"]
    for name, table in one["tables"].items():
        assert table.num_rows > 0 and ranges["tables"][name].equals(table), name
        ids = table[S.ID].to_pylist()
        assert ids == sorted(ids)
    assert ranges["quarantine"].equals(one["quarantine"])
    assert one["quarantine"].num_rows > 0


def test_id_ranges_still_fail_on_a_sample_without_item(tmp_path: Path) -> None:
    items, samples = _items_and_samples()
    dio.write_table(items.slice(1), str(tmp_path / "items" / "a.parquet"))
    dio.write_table(samples, str(tmp_path / "samples" / "a.parquet"))
    cfg = Config()
    cfg.construct.window_rows = 5
    with pytest.raises(ValueError, match="have no item"):
        run_construct(cfg, RunLayout(str(tmp_path)))
