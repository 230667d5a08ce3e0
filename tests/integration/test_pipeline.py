"""The whole pipeline end to end at smoke size, through the job's CLI, on the session's local Ray.

Every stage runs for real (prepare, base model, sample, construct, reference, six trainings with the DPO
ablation layer `configs/ablation.yaml`, evaluate, report) on a few hundred ShapesWorld items with a few
training steps each: the checks are the contracts between stages and the outputs users read, not accuracy
(that is the full embedded run's job). A rerun with the same config must skip every stage; a changed eval
setting must redo only evaluate and report.
A second run in a fresh directory, with other actor counts and batch sizes, must give identical samples
and metrics (DESIGN 1.6): `tests/integration/test_object_storage.py`'s run on S3 is that run. Trainings
run in Ray Train's local mode here to keep CI short (each Ray Train worker group costs ~40 s to start on 2
cores); `tests/integration/test_train.py` runs the same loop on real Ray Train workers, as `make demo`
does. The first run is the session's `smoke_pipeline` (tests/conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pytest

from inbol_ray import schema as S
from inbol_ray.checkpoint import follow_export
from inbol_ray.data import io as dio
from jobs import pipeline as pipeline_job

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["base", "refusal_prompt", "sft", "idk_it", "dpo1", "dpo2", "dpo3", "cadpo"]
DATASETS = [
    "shapes_val",
    "shapes_id_test",
    "shapes_ood_paraphrase",
    "shapes_ood_scene",
    "shapes_unanswerable",
]


def test_pipeline_end_to_end_and_rerun(
    ray_local, smoke_pipeline: tuple[Path, list[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, smoke, out = smoke_pipeline

    def run(run_dir: Path, extra: list[str], capsys: pytest.CaptureFixture[str]) -> str:
        layers = [str(ROOT / "configs" / name) for name in ("tiny.yaml", "ablation.yaml")]
        argv = ["--config", layers[0], "--config", layers[1], "--run-dir", str(run_dir), *smoke, *extra]
        assert pipeline_job.main(argv) == 0
        return capsys.readouterr().out

    assert "[13/13] report: done" in out

    metrics = dio.read_table(str(run_dir / "metrics.parquet"))
    assert metrics.schema.names[:6] == ["method", "dataset", "n", "acc", "refr", "s_trust"]
    cells = {
        (m, d) for m, d in zip(metrics["method"].to_pylist(), metrics["dataset"].to_pylist(), strict=True)
    }
    assert cells == {(m, d) for m in METHODS for d in DATASETS}
    for row in metrics.to_pylist():
        assert row["n"] == 16
        assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["refr"] <= 1.0
        assert row["s_trust"] == pytest.approx(2 * row["acc"] + row["refr"] - 1)

    samples = dio.read_table(str(run_dir / "samples"))
    assert samples.num_rows == 64 and len(set(samples[S.ID].to_pylist())) == 64
    assert set(pc.list_value_length(samples[S.RESPONSES]).to_pylist()) == {3}
    sample_counts = json.loads((run_dir / "manifests" / "sample.json").read_text())["counts"]
    assert sample_counts["done"] + sample_counts["quarantined"] == sample_counts["items"] == 64

    for method in METHODS[2:]:  # every trained method left a loadable HF checkpoint
        assert (Path(follow_export(str(run_dir / "models" / method))) / "config.json").exists(), method
    report = (run_dir / "report.md").read_text()
    assert all(f"| {m} " in report for m in METHODS)
    assert (
        "## Against the reference band" in report and "does not apply" in report
    )  # smoke size, not tiny.yaml
    headings = {line.lstrip("# ").strip() for line in report.splitlines()}
    assert {"In-domain", "Out-of-domain", "Validation (where settings are chosen)"} <= headings

    again = run(run_dir, [], capsys)
    assert again.count("up to date, skipped") == 13, again

    changed = run(run_dir, ["eval.conf_bins=3"], capsys)
    redone = [
        line.split("]")[1].split(":")[0].strip() for line in changed.splitlines() if ": running" in line
    ]
    assert redone == ["evaluate", "report"], changed
    assert "fully reused" in changed  # no answer depends on conf_bins: every evaluation shard is reused
