"""Confidence from K graded samples, buckets, and the vectorised samples-table batch function."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inbol_ray import schema
from inbol_ray.boundary import bucket_of, confidence, grade_samples_batch
from inbol_ray.config import ConstructConfig, GradingConfig

ORDER = {"unknown": 0, "mixed": 1, "known": 2}


def test_confidence_counts_correct_non_refusals() -> None:
    assert confidence([True, True, False, False], [False, False, False, True], True) == 0.5
    # A sample flagged both correct and refused (should not happen) still never counts as correct.
    assert confidence([True, True], [True, False], True) == 0.5
    assert confidence([True] * 10, [False] * 10, True) == 1.0


def test_unanswerable_items_have_confidence_zero() -> None:
    assert confidence([True, True], [False, False], False) == 0.0


def test_confidence_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        confidence([True], [False, False], True)
    with pytest.raises(ValueError, match="at least one sample"):
        confidence([], [], True)


@pytest.mark.parametrize(
    ("conf", "bucket"), [(1.0, "known"), (0.9, "mixed"), (0.1, "mixed"), (0.0, "unknown")]
)
def test_default_buckets_are_all_or_nothing(conf: float, bucket: str) -> None:
    assert bucket_of(conf, ConstructConfig()) == bucket


def test_buckets_follow_configured_thresholds() -> None:
    cfg = ConstructConfig(tau_known=0.8, tau_unknown=0.2)
    assert [bucket_of(c, cfg) for c in (0.8, 0.79, 0.21, 0.2)] == ["known", "mixed", "mixed", "unknown"]


@pytest.mark.parametrize("conf", [-0.1, 1.1, float("nan")])
def test_bucket_rejects_confidence_outside_unit_interval(conf: float) -> None:
    with pytest.raises(ValueError):
        bucket_of(conf, ConstructConfig())


@settings(max_examples=300, deadline=None)
@given(
    taus=st.tuples(st.floats(0, 1), st.floats(0, 1)).filter(lambda t: t[0] < t[1]),
    c1=st.floats(0, 1),
    c2=st.floats(0, 1),
)
def test_buckets_are_monotone_in_confidence(taus: tuple[float, float], c1: float, c2: float) -> None:
    cfg = ConstructConfig(tau_unknown=taus[0], tau_known=taus[1])
    lo, hi = sorted((c1, c2))
    assert ORDER[bucket_of(lo, cfg)] <= ORDER[bucket_of(hi, cfg)]


def _batch() -> pd.DataFrame:
    return pd.DataFrame(
        {
            schema.ID: ["v", "e", "m", "u"],
            schema.RESPONSES: [
                ["cat", "Cat.", "dog", "I don't know"],
                ["two", "3", "2", "2"],
                np.array(["B", "(A)", "Sorry, I can't help with it", "The answer is B"], dtype=object),
                ["a cat", "I'm not sure", "dog", "cat"],
            ],
            schema.ANSWERS: [["cat"] * 3 + ["kitten"] * 7, ["2"], ["B"], []],
            schema.CHOICES: [None, None, ["cat", "dog", "Sorry, I can't help with it"], None],
            schema.METRIC: ["vqa_soft", "exact", "mc_letter", "exact"],
            schema.ANSWERABLE: [True, True, True, False],
        }
    )


def test_grade_samples_batch_grades_every_metric_and_unanswerable_items() -> None:
    out = grade_samples_batch(_batch(), GradingConfig())
    assert list(out.columns) == schema.SAMPLES.names
    by_id = out.set_index(schema.ID)
    assert by_id.loc["v", schema.CORRECT] == [True, True, False, False]  # 3 of 10 annotators -> 0.9
    assert by_id.loc["v", schema.REFUSED] == [False, False, False, True]
    assert by_id.loc["e", schema.CORRECT] == [True, False, True, True]
    assert by_id.loc["m", schema.CORRECT] == [True, False, False, True]
    # a refusal-like option on an answerable item is a (wrong) answer: only BeyondVisQA-style unanswerable
    # items offer it as the way to refuse
    assert by_id.loc["m", schema.REFUSED] == [False, False, False, False]
    assert by_id.loc["u", schema.CORRECT] == [False] * 4
    assert by_id.loc["u", schema.REFUSED] == [False, True, False, False]
    assert by_id[schema.CONF].to_dict() == {"v": 0.5, "e": 0.75, "m": 0.5, "u": 0.0}
    assert schema.BUCKET not in out.columns  # buckets are construct's (from conf and its thresholds)


def test_grade_samples_batch_passes_the_vqa_threshold_and_accepts_arrow() -> None:
    table = pa.Table.from_pandas(_batch(), preserve_index=False)
    strict = grade_samples_batch(table, GradingConfig(vqa_correct_at=1.0))
    assert strict.set_index(schema.ID).loc["v", schema.CORRECT] == [False] * 4  # 0.9 < 1.0
    conformed = schema.conform(pa.Table.from_pandas(strict, preserve_index=False), schema.SAMPLES, "test")
    assert conformed.num_rows == 4


def test_all_correct_item_is_known() -> None:
    batch = _batch().iloc[[1]].copy()
    batch[schema.RESPONSES] = [["2", "two", "2.", "Two"]]
    out = grade_samples_batch(batch, GradingConfig())
    assert out[schema.CONF].tolist() == [1.0] and bucket_of(1.0, ConstructConfig()) == "known"
