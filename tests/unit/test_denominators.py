"""The report's denominators: per set, rows read, left out, quarantined and evaluated (issue 30)."""

from __future__ import annotations

import pandas as pd

from inbol_ray import schema as S
from inbol_ray.eval.denominators import data_section, denominators_table, training_mix, with_datasets
from inbol_ray.eval.report import render_report
from inbol_ray.generation.grade import grade_predictions
from inbol_ray.metrics import metrics_table

SPLITS = {"vqav2": "train", "oven": "train", "mmbench": "ood_test", "gqa": "ood_test"}
COUNTS = {
    "vqav2": {"read": 1000, "items": 95, "quarantined": 5, "not_sampled": 900},
    "oven": {"read": 40, "items": 40, "quarantined": 0},
    "mmbench": {"read": 12, "items": 10, "quarantined": 2},
    "gqa": {"read": 8, "items": 8, "quarantined": 0},
}


def _metrics() -> pd.DataFrame:
    return pd.DataFrame(
        [
            {S.METHOD: m, S.DATASET: d, S.N: n, S.ACC: 0.5, S.REFR: 0.1, S.S_TRUST: 0.1}
            for m in ("base", "cadpo")
            for d, n in (("mmbench", 9), ("gqa", 8))
        ]
    )


def test_every_set_shows_read_left_out_quarantined_and_evaluated() -> None:
    too_long = "prompt too long: 3000 tokens > max_model_len 2048"
    evalq = pd.DataFrame(
        # the same item quarantined for two methods counts once
        {S.ROW_KEY: ["mmbench:7", "mmbench:7"], S.REASON: [too_long, too_long], S.DATASET: ["mmbench"] * 2}
    )
    prepq = pd.DataFrame(
        {S.ROW_KEY: ["mmbench:3", "mmbench:4"], S.REASON: ["field 'image': not a decodable image"] * 2,
         S.DATASET: ["mmbench"] * 2}
    )  # fmt: skip
    table = denominators_table(COUNTS, SPLITS, _metrics(), evalq, prepq)
    lines = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()
    }
    assert lines["`vqav2`"] == ["train", "1000", "900", "5", "95", "–", "–"]
    assert lines["`mmbench`"] == [
        "ood_test",
        "12",
        "0",
        "2 field 'image' (2)",
        "10",
        "9",
        "1 prompt too long (1)",
    ]
    assert lines["`gqa`"][-2:] == ["8", "0"]
    assert list(lines)[2:] == ["`oven`", "`vqav2`", "`gqa`", "`mmbench`"]  # training sets first


def test_training_mix_and_the_section() -> None:
    assert training_mix(COUNTS, SPLITS) == "Training mix (135 items): `vqav2` 95 (70.4%), `oven` 40 (29.6%)."
    section = data_section(COUNTS, SPLITS, _metrics(), pd.DataFrame(columns=[S.ROW_KEY, S.REASON, S.DATASET]))
    assert section[0].startswith("## Data") and any(line.startswith("Training mix") for line in section)
    assert data_section({}, SPLITS, _metrics(), pd.DataFrame()) == []


def test_quarantine_rows_find_their_set() -> None:
    frame = pd.DataFrame({S.ROW_KEY: ["a/1", "gqa:9", "zzz"], S.REASON: ["r"] * 3})
    got = with_datasets(frame, {"a/1": "shapes_id_test"}, ["gqa", "mmbench"])
    assert got[S.DATASET].tolist() == ["shapes_id_test", "gqa", "zzz"]


def test_a_gold_a_item_is_scored_in_the_report() -> None:
    """Multiple choice through evaluation grading, metrics and the report: every gold letter counts."""
    choices = ["cat", "dog", "bird", "fish"]
    items = pd.DataFrame(
        [
            {S.ID: f"mmbench:{g}", S.DATASET: "mmbench", S.RESPONSES: [g], S.ANSWERS: [g], S.CHOICES: choices,
             S.METRIC: "mc_letter", S.ANSWERABLE: True, S.QUESTION: "Which animal?"}
            for g in "ABCD"
        ]
        + [{S.ID: "mmbench:wrongA", S.DATASET: "mmbench", S.RESPONSES: ["A"], S.ANSWERS: ["C"], S.CHOICES: choices,
            S.METRIC: "mc_letter", S.ANSWERABLE: True, S.QUESTION: "Which animal?"}]
    )  # fmt: skip
    predictions = grade_predictions(items, "base", 0.5)
    assert predictions[S.CORRECT].tolist() == [True, True, True, True, False]
    assert not predictions[S.REFUSED].any()
    metrics = metrics_table(predictions)
    text = render_report(metrics, {"mmbench": "ood_test"}, ["base"])
    row = next(line for line in text.splitlines() if line.startswith("| base"))
    assert "80.0" in row and "60.0" in row  # Acc 4/5; s_trust 2*0.8 + 0 - 1
