"""Construction of IDK-IT / SFT-baseline / CA-DPO tables."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

from inbol_ray import schema
from inbol_ray.boundary.construct import (
    NO_ANSWER,
    NO_INCORRECT,
    SAME_RESPONSE,
    Built,
    build_cadpo_pairs,
    build_idk_it,
    build_sft_baseline,
    merge_built,
    most_frequent,
)
from inbol_ray.config import ConstructConfig
from inbol_ray.refusal import REFUSAL_TEMPLATES, refusal_target

IDK = REFUSAL_TEMPLATES[0]


def _row(item_id: str, responses: list[str], correct: list[bool], refused: list[bool], **over: Any) -> dict:
    conf = sum(c and not r for c, r in zip(correct, refused, strict=True)) / len(responses)
    row = {
        schema.ID: item_id,
        schema.DATASET: "toy",
        schema.SPLIT: "train",
        schema.IMAGE: f"png-{item_id}".encode(),
        schema.IMAGE_PATH: None,
        schema.QUESTION: f"question {item_id}?",
        schema.PROMPT: f"question {item_id}?\nAnswer the question using a single word or phrase.",
        schema.ANSWERS: ["red", "Red", "red.", "blue"],
        schema.CHOICES: None,
        schema.METRIC: "exact",
        schema.ANSWERABLE: True,
        schema.CATEGORY: "easy",
        schema.SOURCE: "toy.jsonl",
        schema.RESPONSES: responses,
        schema.CORRECT: correct,
        schema.REFUSED: refused,
        schema.CONF: conf,
    }
    row.update(over)
    if not row[schema.ANSWERABLE]:
        row[schema.CONF] = 0.0
    return row


def _frame() -> pd.DataFrame:
    F, T = False, True
    return pd.DataFrame(
        [
            _row("known", ["red", "Red"], [T, T], [F, F]),
            _row("mixed", ["red", "Blue", "blue.", "green"], [T, F, F, F], [F, F, F, F]),
            _row("unknown", ["green", "I don't know", "Green", "pink"], [F, F, F, F], [F, T, F, F]),
            _row(
                "unans", ["a dog", "A dog.", "I'm not sure", "cat"], [F] * 4, [F, F, T, F], answerable=False
            ),
            _row("all_refuse", ["I don't know", "not sure"], [F, F], [T, T]),
        ]
    )


def _values(row: pd.Series, columns: list[str]) -> list[Any]:
    """Row values with missing cells as None (pandas may hold them as NaN in string columns)."""
    return [None if pd.isna(v) else v for v in row[columns].tolist()]


def _accounted(built: Built, n_input: int) -> None:
    assert built.counts["input"] == n_input == built.counts["output"] + built.counts["quarantined"]
    assert len(built.table) == built.counts["output"] and len(built.quarantine) == built.counts["quarantined"]


def test_most_frequent_counts_normalised_forms_and_keeps_a_real_spelling() -> None:
    assert most_frequent(["Blue", "red", "blue.", "the blue", "red"]) in ("Blue", "blue.", "the blue")
    assert most_frequent(["Red", "red", "Red", "blue"]) == "Red"
    assert most_frequent(["", "."]) is None


def test_idk_it_refuses_below_tau_idk_and_on_unanswerable_items() -> None:
    built = build_idk_it(_frame(), ConstructConfig(tau_idk=0.5))
    _accounted(built, 5)
    assert list(built.table.columns) == schema.SFT.names
    by_id = built.table.set_index(schema.ID)
    assert by_id.loc["known", schema.TARGET] == "red"  # most common gold by normalised form
    assert by_id.loc["known", schema.TARGET_KIND] == "answer"
    for item in ("mixed", "unknown", "unans", "all_refuse"):  # conf 0.25, 0, unanswerable, 0
        assert (by_id.loc[item, schema.TARGET], by_id.loc[item, schema.TARGET_KIND]) == (IDK, "refusal")
    assert built.counts["target_refusal"] == 4 and built.counts["target_answer"] == 1
    # the prompt the samples were drawn with, byte for byte
    assert (
        by_id.loc["known", schema.PROMPT]
        == "question known?\nAnswer the question using a single word or phrase."
    )
    assert by_id.loc["known", schema.IMAGE] == b"png-known"


def test_idk_it_threshold_is_strict_less_than() -> None:
    frame = pd.DataFrame([_row("half", ["red", "green"], [True, False], [False, False])])
    assert build_idk_it(frame, ConstructConfig(tau_idk=0.5)).table[schema.TARGET_KIND].tolist() == ["answer"]
    assert build_idk_it(frame, ConstructConfig(tau_idk=0.51)).table[schema.TARGET_KIND].tolist() == [
        "refusal"
    ]


def test_sft_baseline_refuses_only_unanswerable_items() -> None:
    built = build_sft_baseline(_frame(), ConstructConfig())
    _accounted(built, 5)
    kinds = built.table.set_index(schema.ID)[schema.TARGET_KIND].to_dict()
    assert kinds == {
        "known": "answer",
        "mixed": "answer",
        "unknown": "answer",
        "unans": "refusal",
        "all_refuse": "answer",
    }


def test_rotating_refusal_template_and_custom_prompt() -> None:
    built = build_sft_baseline(
        _frame(), ConstructConfig(refusal_template=-1), prompt_fn=lambda r: f"Q: {r[schema.QUESTION]}"
    )
    row = built.table.set_index(schema.ID).loc["unans"]
    assert row[schema.TARGET] == refusal_target("unans", -1)
    assert row[schema.PROMPT] == "Q: question unans?"


def test_missing_gold_falls_back_to_a_correct_sample_then_quarantine() -> None:
    frame = pd.DataFrame(
        [
            _row("sample_ok", ["Purple", "purple"], [True, True], [False, False], answers=[]),
            _row("nothing", ["x"], [False], [False], answers=[]),
        ]
    )
    built = build_sft_baseline(frame, ConstructConfig())
    _accounted(built, 2)
    assert built.table[schema.TARGET].tolist() == ["Purple"]
    assert built.counts["fallback_correct_from_sample"] == 1
    assert built.quarantine.to_dict("records") == [
        {
            schema.SOURCE: "toy.jsonl",
            schema.ROW_KEY: "nothing",
            schema.STAGE: "construct/sft_baseline",
            schema.REASON: NO_ANSWER,
        }
    ]


def test_cadpo_rows_carry_the_responses_their_bucket_needs() -> None:
    built = build_cadpo_pairs(_frame(), ConstructConfig())
    _accounted(built, 5)
    assert list(built.table.columns) == schema.CADPO_PAIRS.names
    t = built.table.set_index(schema.ID)
    assert _values(t.loc["known"], [schema.RESP_CORRECT, schema.RESP_INCORRECT, schema.BUCKET]) == [
        "red",
        None,
        "known",
    ]
    assert _values(t.loc["mixed"], [schema.RESP_CORRECT, schema.RESP_INCORRECT]) == ["red", "Blue"]
    assert t.loc["mixed", schema.CONF] == 0.25
    assert _values(t.loc["unknown"], [schema.RESP_CORRECT, schema.RESP_INCORRECT]) == [None, "green"]
    # unanswerable: the most frequent non-refusal sample is the model's hallucination
    assert _values(t.loc["unans"], [schema.RESP_CORRECT, schema.RESP_INCORRECT, schema.BUCKET]) == [
        None,
        "a dog",
        "unknown",
    ]
    assert (t[schema.RESP_REFUSAL] == IDK).all()
    assert built.quarantine[schema.ROW_KEY].tolist() == ["all_refuse"]
    assert built.quarantine[schema.REASON].tolist() == [NO_INCORRECT]
    assert built.counts["bucket_known"] == built.counts["bucket_mixed"] == 1
    assert built.counts["bucket_unknown"] == 2 and built.counts["unanswerable"] == 1
    table = pa.Table.from_pandas(built.table, preserve_index=False)
    assert schema.conform(table, schema.CADPO_PAIRS, "test").num_rows == 4


def test_cadpo_multiple_choice_fallback_picks_a_wrong_non_refusal_option() -> None:
    choices = ["cat", "dog", "bird", "Sorry, I can't help with it"]
    frame = pd.DataFrame(
        [
            _row(
                f"mc{i}",
                ["I don't know", "B"],
                [False, True],
                [True, False],
                answers=["B"],
                choices=choices,
                metric="mc_letter",
            )
            for i in range(20)
        ]
    )
    built = build_cadpo_pairs(frame, ConstructConfig(seed=3))
    _accounted(built, 20)
    assert built.counts["fallback_incorrect_from_wrong_option"] == 20
    assert set(built.table[schema.RESP_INCORRECT]) == {"A", "C"}  # never the gold B, never the refusal D
    again = build_cadpo_pairs(frame, ConstructConfig(seed=3))
    assert again.table[schema.RESP_INCORRECT].tolist() == built.table[schema.RESP_INCORRECT].tolist()


def test_cadpo_buckets_follow_confidence_under_the_construct_thresholds() -> None:
    """Samples store conf only; the bucket comes from construct's thresholds, so moving one re-buckets."""
    frame = pd.DataFrame([_row("m", ["red", "red", "red", "blue"], [True, True, True, False], [False] * 4)])
    assert schema.BUCKET not in frame.columns
    assert build_cadpo_pairs(frame, ConstructConfig()).table[schema.BUCKET].tolist() == ["mixed"]
    built = build_cadpo_pairs(frame, ConstructConfig(tau_known=0.75))
    assert built.table[schema.BUCKET].tolist() == ["known"] and built.counts["bucket_known"] == 1


def test_cadpo_quarantines_a_degenerate_pair() -> None:
    # With a vqa_soft threshold above a lone gold answer's score, the gold and a wrong sample coincide.
    # Here "blue" is the first of two equally common gold answers, yet graded wrong as a sample.
    frame = pd.DataFrame([_row("d", ["red", "blue"], [True, False], [False, False], answers=["blue", "red"])])
    built = build_cadpo_pairs(frame, ConstructConfig())
    assert built.quarantine[schema.REASON].tolist() == [SAME_RESPONSE]


def test_builders_accept_arrow_batches_and_merge_keeps_the_accounting() -> None:
    frame = _frame()
    parts = [
        build_idk_it(pa.Table.from_pandas(frame.iloc[i : i + 2], preserve_index=False), ConstructConfig())
        for i in (0, 2, 4)
    ]
    merged = merge_built(parts)
    _accounted(merged, 5)
    whole = build_idk_it(frame, ConstructConfig())
    assert merged.table[schema.TARGET].tolist() == whole.table[schema.TARGET].tolist()
    with pytest.raises(ValueError):
        merge_built([])


def test_built_refuses_broken_accounting() -> None:
    with pytest.raises(AssertionError, match="row accounting"):
        Built(table=pd.DataFrame({"a": [1]}), quarantine=pd.DataFrame(), counts={"input": 2})
