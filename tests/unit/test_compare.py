"""Run comparison: paired bootstrap confidence intervals on the difference in s_trust."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from inbol_ray import schema as S
from inbol_ray.data import io as dio
from inbol_ray.eval.compare import (
    CI_HI,
    CI_LO,
    DELTA,
    SIGNIFICANT,
    UNPAIRED,
    compare_predictions,
    item_scores,
    paired_bootstrap_ci,
)
from jobs import compare as compare_job


def predictions(outcomes: dict[str, list[int]], dataset: str = "set") -> pd.DataFrame:
    """Rows from per-item outcomes (+1 correct, 0 refusal, -1 wrong) per method."""
    rows = [
        {S.MODEL: m, S.DATASET: dataset, S.ID: f"q{i}", S.RESPONSE: "", S.CORRECT: o == 1, S.REFUSED: o == 0}
        for m, seq in outcomes.items()
        for i, o in enumerate(seq)
    ]
    return pd.DataFrame(rows)


def test_item_scores_are_plus_one_zero_minus_one() -> None:
    assert item_scores(np.array([True, False, False]), np.array([False, True, False])).tolist() == [1, 0, -1]


def test_identical_runs_differ_by_exactly_zero() -> None:
    rng = np.random.default_rng(0)
    pred = predictions({"cadpo": rng.choice([-1, 0, 1], size=200).tolist()})
    row = compare_predictions(pred, pred, samples=500).iloc[0]
    assert (row[DELTA], row[CI_LO], row[CI_HI], row[SIGNIFICANT]) == (0.0, 0.0, 0.0, False)


def test_all_wrong_to_all_right_is_plus_200_points_and_significant() -> None:
    row = compare_predictions(predictions({"m": [-1] * 30}), predictions({"m": [1] * 30}), samples=200).iloc[
        0
    ]
    assert row[DELTA] == 2.0 and row[CI_LO] == 2.0 and row[CI_HI] == 2.0 and row[SIGNIFICANT]


def test_interval_width_matches_the_normal_approximation() -> None:
    # Mean of n paired differences: the 95% interval is about mean +- 1.96 * sd / sqrt(n).
    rng = np.random.default_rng(1)
    diff = rng.choice([-2.0, -1.0, 0.0, 1.0, 2.0], size=800, p=[0.1, 0.15, 0.4, 0.2, 0.15])
    lo, hi = paired_bootstrap_ci(diff, 4000, np.random.default_rng(2))
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert lo < diff.mean() < hi


def test_pairing_cancels_item_difficulty() -> None:
    # B = A with 10% of wrong answers turned into refusals: a small but consistent gain. Paired on items it is
    # significant; as two independent samples of that size it would not be.
    rng = np.random.default_rng(3)
    a = rng.choice([-1, 1], size=400).tolist()
    b = [0 if o == -1 and rng.random() < 0.1 else o for o in a]
    row = compare_predictions(predictions({"m": a}), predictions({"m": b}), samples=1000).iloc[0]
    assert row[DELTA] > 0 and row[SIGNIFICANT]
    unpaired_half = 1.96 * np.sqrt(np.var(a) / 400 + np.var(b) / 400)
    assert row[DELTA] < unpaired_half


def test_seeded_and_independent_of_other_cells() -> None:
    rng = np.random.default_rng(4)
    a = predictions(
        {"m": rng.choice([-1, 0, 1], size=100).tolist(), "n": rng.choice([-1, 1], size=100).tolist()}
    )
    b = predictions(
        {"m": rng.choice([-1, 0, 1], size=100).tolist(), "n": rng.choice([-1, 1], size=100).tolist()}
    )
    both = compare_predictions(a, b, samples=300, seed=7).set_index("method_a")
    again = compare_predictions(a, b, samples=300, seed=7).set_index("method_a")
    only_m = compare_predictions(a, b, samples=300, seed=7, methods={"m": "m"}).set_index("method_a")
    other_seed = compare_predictions(a, b, samples=300, seed=8).set_index("method_a")
    pd.testing.assert_frame_equal(both, again)
    assert only_m.loc["m", CI_LO] == both.loc["m", CI_LO]  # adding method n does not move m's interval
    assert (
        other_seed.loc["m", CI_LO] != both.loc["m", CI_LO]
        or other_seed.loc["m", CI_HI] != both.loc["m", CI_HI]
    )


def test_items_in_one_run_only_are_left_out_and_counted() -> None:
    a = predictions({"m": [1, 1, -1, -1]})
    b = predictions({"m": [1, 1, 1]})  # q3 missing in B
    row = compare_predictions(a, b, samples=100).iloc[0]
    assert row[S.N] == 3 and row[UNPAIRED] == 1
    assert row[DELTA] == pytest.approx(2 / 3)


def test_two_methods_of_one_run() -> None:
    pred = pd.concat([predictions({"base": [-1] * 20}), predictions({"cadpo": [0] * 20})])
    frame = compare_predictions(pred, pred, samples=100, methods={"base": "cadpo"})
    assert frame[["method_a", "method_b"]].values.tolist() == [["base", "cadpo"]]
    assert frame.iloc[0][DELTA] == 1.0


def test_cli_prints_a_table_and_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        pred = pd.concat(
            [
                predictions({m: rng.choice([-1, 0, 1], size=50).tolist()}, d)
                for m in ("base", "cadpo")
                for d in ("x", "y")
            ]
        )
        dio.write_table(
            pa.Table.from_pandas(pred, preserve_index=False), str(tmp_path / name / "predictions.parquet")
        )
    out_md = tmp_path / "cmp.md"
    argv = [str(tmp_path / "a"), str(tmp_path / "b"), "--samples", "200", "--out", str(out_md)]
    assert compare_job.main(argv) == 0
    text = capsys.readouterr().out
    assert "| base " in text and "95% CI" in text and text.count("\n| cadpo") == 2
    assert out_md.read_text().strip() == text.strip()
    assert len(dio.read_table(str(tmp_path / "cmp.parquet"))) == 4
    assert compare_job.main([str(tmp_path / "a"), str(tmp_path / "b"), "--methods", "base"]) == 2
    assert compare_job.main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert compare_job.main([str(tmp_path / "a"), str(tmp_path / "b"), "--methods", "base:dpo1"]) == 2
