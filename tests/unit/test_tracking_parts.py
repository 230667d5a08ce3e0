"""The pure parts of experiment tracking: what a tracker is sent (flattened config, tags, metric names,
stage counts, evaluation cells, the commit), the warn-once guard, and the DPO metrics TRL users read.

The trackers themselves are exercised for real in tests/integration/test_tracking.py (an MLflow server,
W&B offline files); here, the shapes both of them receive.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import warnings
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from inbol_ray.config import load_config
from inbol_ray.data import io as dio
from inbol_ray.tracking.guard import Guard, TrackingWarning
from inbol_ray.tracking.params import (
    flatten,
    git_commit,
    metric_name,
    parse_tags,
    split_counts,
    step_metrics,
)
from inbol_ray.tracking.session import Tracking, eval_metrics
from inbol_ray.train import step_metrics as sm
from inbol_ray.train.data import DPO_KINDS
from inbol_ray.train.losses import PAIRS, bucket_codes, dpo_stats
from inbol_ray.train.objectives import step_means

ROOT = Path(__file__).resolve().parents[2]
PAIR_ROWS = {"correct>refusal": (0,), "correct>incorrect": (1,), "refusal>incorrect": (1, 2)}
"""The buckets (known 0, mixed 1, unknown 2) whose rows train each pair (DESIGN.md 1.2)."""
MLFLOW_NAME = re.compile(r"^[\w./\- :]+$")  # mlflow.utils.validation's rule for metric and param names


def test_flattened_config_keys_are_the_override_paths() -> None:
    """Every parameter is `section.key` as an override names it, with the value the config holds: a tracked
    run's parameter table is the overrides that reproduce it."""
    cfg = load_config([ROOT / "configs" / "tiny.yaml", ROOT / "configs" / "ablation.yaml"], ["train.lr=3e-4"])
    flat = flatten(cfg)
    assert flat["train.lr"] == 3e-4 and flat["model.build_tiny"] is True
    assert json.loads(flat["eval.methods"]) == cfg.eval.methods  # a list stays one value, as one override
    for key, value in flat.items():
        held = cfg
        for part in key.split("."):
            held = getattr(held, part)
        assert (json.loads(value) if isinstance(held, list) else value) == held, key
        assert MLFLOW_NAME.match(key), key


def test_flatten_sections_in_lists_by_position() -> None:
    flat = flatten({"data": {"datasets": [{"name": "a", "n": 1}, {"name": "b", "n": None}], "tags": ["x"]}})
    assert flat == {
        "data.datasets.0.name": "a",
        "data.datasets.0.n": 1,
        "data.datasets.1.name": "b",
        "data.datasets.1.n": None,
        "data.tags": '["x"]',
    }


def test_tags_are_key_value_pairs() -> None:
    assert parse_tags(["team=vision", " sweep = lr ", "query=a=b"]) == {
        "team": "vision",
        "sweep": "lr",
        "query": "a=b",
    }
    assert parse_tags([]) == {}


def test_step_rows_become_metrics_trackers_accept() -> None:
    """A training row as the loop writes it: pair names lose their `>` (MLflow rejects it), NaN (a pair
    without rows in the step) and the row ids are left out, the step is the axis, not a metric."""
    row = {
        "step": 3,
        "epoch": 0,
        "loss": 0.69,
        "correct>refusal/margin": 0.1,
        "correct>incorrect/accuracy": float("nan"),
        "rewards/margins": 0.05,
        "ids": ["a", "b"],
    }
    assert step_metrics(row) == {
        "epoch": 0.0,
        "loss": 0.69,
        "correct_vs_refusal/margin": 0.1,
        "rewards/margins": 0.05,
    }
    assert metric_name("refusal>incorrect/rewards/chosen") == "refusal_vs_incorrect/rewards/chosen"
    assert MLFLOW_NAME.match(metric_name("odd@name#1"))


def test_stage_counts_split_into_metrics_and_params() -> None:
    counts = {
        "items": 64,
        "family_accuracy": {"shape": {"n": 8, "acc": 0.5}},
        "metrics": "/runs/x/metrics.parquet",
        "correct>refusal/margin": float("nan"),
        "verified": True,
    }
    metrics, params = split_counts(counts, "counts")
    assert metrics == {
        "counts.items": 64.0,
        "counts.family_accuracy.shape.n": 8.0,
        "counts.family_accuracy.shape.acc": 0.5,
        "counts.verified": 1.0,
    }
    assert params == {"counts.metrics": "/runs/x/metrics.parquet"}


def test_eval_metrics_one_value_per_method_set_and_measure(tmp_path: Path) -> None:
    uri = str(tmp_path / "metrics.parquet")
    dio.write_table(
        pa.table(
            {
                "method": ["base", "cadpo"],
                "dataset": ["shapes_val", "shapes_val"],
                "n": [16, 16],
                "acc": [0.5, 0.25],
                "refr": [0.0, 0.5],
                "s_trust": [0.0, 0.0],
            }
        ),
        uri,
    )
    got = eval_metrics(uri)
    assert got["eval/cadpo/shapes_val/refr"] == 0.5 and got["eval/base/shapes_val/n"] == 16
    assert len(got) == 2 * 4


def test_git_commit_of_this_checkout_and_never_a_failure(tmp_path: Path, monkeypatch) -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert git_commit(ROOT)["git.commit"] == head.stdout.strip()
    assert git_commit(tmp_path) == {}  # not a checkout (an installed wheel)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert git_commit(ROOT) == {}


def test_guard_warns_once_per_session_and_then_stays_off() -> None:
    calls = []

    def down(*_):
        calls.append(1)
        raise ConnectionError("connection refused")

    first, second = Guard("session-a", "mlflow at http://x"), Guard("session-a", "mlflow at http://x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert first("logging step 1", down) is None
        assert second("logging step 2", down) is None  # same run (the loop in local mode): silent, not called
        assert first("ending", lambda: 1) is None
        other = Guard("session-b", "wandb at its default location")
        assert other("starting", lambda x: x + 1, 1) == 2
        other("starting", down)
    tracking = [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(tracking) == 2 and len(calls) == 2
    assert "connection refused" in str(tracking[0].message)
    assert not first.on and not other.on


def test_tracking_off_is_a_no_op() -> None:
    off = Tracking()
    with off.stage("prepare", "h") as stage:
        stage.done({"items": 3})
    off.skipped("sample", "h", {"items": 3})
    assert off.start_method("cadpo", {"train.lr": 1e-5}) is None
    off.end_method("cadpo", {"metrics.jsonl": "/nowhere"})
    off.close({"report": {}}, ok=True)
    with pytest.raises(RuntimeError), off.stage("construct", "h"):  # a failing stage still fails
        raise RuntimeError("stage failed")


def _batch(seed: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logps, ref = -5 * torch.rand(rows, 3, generator=g), -5 * torch.rand(rows, 3, generator=g)
    groups = bucket_codes(["known", "mixed", "unknown"] * (rows // 3))
    return logps, ref, groups


def _objective_sums(logps, ref, groups, beta) -> dict[str, float]:
    """What dpo_objective adds per micro-batch: per pair n, margin and accuracy sums (from dpo_stats)."""
    stats = dpo_stats(
        {k: logps[:, i] for i, k in enumerate(DPO_KINDS)},
        {k: ref[:, i] for i, k in enumerate(DPO_KINDS)},
        groups,
        beta,
    )
    out = {"loss/sum": 0.0}
    for pair in PAIRS:
        n = stats[f"{pair}/n"]
        out[f"{pair}/n"] = n
        for stat in ("margin", "accuracy"):
            out[f"{pair}/{stat}_sum"] = stats[f"{pair}/{stat}"] * n if n else 0.0
    return out


def test_trl_preference_metrics_add_up_over_micro_batches() -> None:
    """Per pair: rewards chosen - rejected is the objective's margin; split into micro-batches the sums give
    the whole step's means; the pooled TRL names weigh each pair by its rows."""
    beta = 0.1
    logps, ref, groups = _batch(0, 12)
    totals: dict[str, float] = {}
    for part in (slice(0, 6), slice(6, 12)):  # two micro-batches (or workers)
        sm.add_sums(totals, _objective_sums(logps[part], ref[part], groups[part], beta))
        sm.add_sums(totals, sm.preference_sums(logps[part], ref[part], groups[part], beta))
    row = {**step_means(totals), **sm.preference_means(totals)}
    whole = dpo_stats(
        {k: logps[:, i] for i, k in enumerate(DPO_KINDS)},
        {k: ref[:, i] for i, k in enumerate(DPO_KINDS)},
        groups,
        beta,
    )
    for pair, (chosen, _) in PAIRS.items():
        margin = row[f"{pair}/rewards/chosen"] - row[f"{pair}/rewards/rejected"]
        assert margin == pytest.approx(whole[f"{pair}/margin"]) == pytest.approx(row[f"{pair}/margin"])
        rows = torch.isin(groups, torch.tensor(PAIR_ROWS[pair]))
        assert row[f"{pair}/logps/chosen"] == pytest.approx(
            float(logps[rows, DPO_KINDS.index(chosen)].mean())
        )
    n = {pair: whole[f"{pair}/n"] for pair in PAIRS}
    assert row["rewards/margins"] == pytest.approx(
        sum(whole[f"{p}/margin"] * n[p] for p in PAIRS) / sum(n.values())
    )
    assert row["rewards/accuracies"] == pytest.approx(
        sum(whole[f"{p}/accuracy"] * n[p] for p in PAIRS) / sum(n.values())
    )
    assert row["rewards/chosen"] - row["rewards/rejected"] == pytest.approx(row["rewards/margins"])


def test_preference_metrics_are_nan_for_a_pair_without_rows() -> None:
    logps, ref, _ = _batch(1, 3)
    known = bucket_codes(["known"] * 3)
    totals = {**_objective_sums(logps, ref, known, 0.1), **sm.preference_sums(logps, ref, known, 0.1)}
    row = sm.preference_means(totals)
    assert math.isnan(row["refusal>incorrect/rewards/chosen"]) and math.isfinite(
        row["correct>refusal/logps/chosen"]
    )
    assert row["rewards/chosen"] == pytest.approx(row["correct>refusal/rewards/chosen"])
