"""Trust scores, per-dataset tables and intrinsic-boundary curves."""

from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inbol_ray import schema
from inbol_ray.metrics import (
    ANSWERED_ACC,
    BIN_HI,
    BIN_LO,
    REFUSAL_RATE,
    boundary_curves,
    metrics_table,
    trust_scores,
)


def test_trust_scores_by_hand() -> None:
    # 2 correct, 1 refusal, 1 wrong: acc 0.5, refr 0.25, s_trust = 2*0.5 + 0.25 - 1 = 0.25 = (1+1+0-1)/4
    scores = trust_scores([True, True, False, False], [False, False, True, False])
    assert scores == {schema.ACC: 0.5, schema.REFR: 0.25, schema.S_TRUST: 0.25}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([1, 0, -1]), min_size=1, max_size=200))
def test_s_trust_is_the_mean_of_plus_one_zero_minus_one(outcomes: list[int]) -> None:
    scores = trust_scores([o == 1 for o in outcomes], [o == 0 for o in outcomes])
    assert scores[schema.S_TRUST] == pytest.approx(sum(outcomes) / len(outcomes), abs=1e-12)
    assert 0.0 <= scores[schema.ACC] + scores[schema.REFR] <= 1.0


def test_trust_scores_reject_inconsistent_inputs() -> None:
    with pytest.raises(ValueError, match="item 1 is both correct and refused"):
        trust_scores([False, True], [False, True])
    with pytest.raises(ValueError, match="differ in length"):
        trust_scores([True], [False, False])
    with pytest.raises(ValueError, match="at least one"):
        trust_scores([], [])


def test_metrics_table_groups_by_method_and_dataset() -> None:
    predictions = pd.DataFrame(
        {
            schema.MODEL: ["base", "base", "base", "cadpo", "cadpo"],
            schema.DATASET: ["gqa", "gqa", "vizwiz", "gqa", "gqa"],
            schema.ID: list("abcde"),
            schema.RESPONSE: ["x"] * 5,
            schema.CORRECT: [True, False, False, True, False],
            schema.REFUSED: [False, False, True, False, True],
        }
    )
    table = metrics_table(predictions)
    assert list(table.columns) == schema.METRICS_TABLE.names
    rows = table.set_index([schema.METHOD, schema.DATASET])
    assert rows.loc[("base", "gqa")].tolist() == [2, 0.5, 0.0, 0.0]
    assert rows.loc[("base", "vizwiz")].tolist() == [1, 0.0, 1.0, 0.0]
    assert rows.loc[("cadpo", "gqa")].tolist() == [2, 0.5, 0.5, 0.5]
    assert (
        schema.conform(pa.Table.from_pandas(table, preserve_index=False), schema.METRICS_TABLE, "t").num_rows
        == 3
    )
    renamed = metrics_table(predictions.rename(columns={schema.MODEL: schema.METHOD}))
    pd.testing.assert_frame_equal(renamed, table)


def test_boundary_curves_bin_k_over_ten_confidences_on_the_intended_side() -> None:
    conf = [0.0, 0.1, 0.2, 0.6, 0.6, 1.0, 1.0]
    correct = [False, False, True, True, False, True, False]
    refused = [True, False, False, False, True, False, True]
    curves = boundary_curves(conf, correct, refused, bins=5)
    assert curves[BIN_LO].tolist() == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert curves[BIN_HI].tolist() == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert curves[schema.N].tolist() == [2, 1, 0, 2, 2]  # 0.6 lands in [0.6, 0.8); 1.0 in the last bin
    assert curves[REFUSAL_RATE].tolist()[:2] == [0.5, 0.0]
    assert math.isnan(curves[REFUSAL_RATE][2]) and math.isnan(curves[ANSWERED_ACC][2])  # empty bin
    assert curves[ANSWERED_ACC].tolist()[:2] == [0.0, 1.0]
    assert curves[ANSWERED_ACC][3] == 1.0 and curves[REFUSAL_RATE][4] == 0.5


def test_boundary_curves_nan_when_everything_in_a_bin_is_refused_and_custom_edges() -> None:
    curves = boundary_curves(
        [0.0, 0.05, 0.9], [False, False, True], [True, True, False], bins=[0.0, 0.5, 1.0]
    )
    assert curves[REFUSAL_RATE].tolist() == [1.0, 0.0]
    assert math.isnan(curves[ANSWERED_ACC][0]) and curves[ANSWERED_ACC][1] == 1.0


@pytest.mark.parametrize(("conf", "bins"), [([1.5], 5), ([0.5], [0.5, 0.4]), ([float("nan")], 5), ([0.5], 0)])
def test_boundary_curves_reject_bad_input(conf: list[float], bins: object) -> None:
    with pytest.raises(ValueError):
        boundary_curves(conf, [False], [False], bins=bins)  # type: ignore[arg-type]
