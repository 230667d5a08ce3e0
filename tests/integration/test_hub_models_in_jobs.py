"""A base model named by Hub id through the jobs (issue 33): `org/tiny` from the session's real hub cache
(`hub_tiny`, offline), resolved by the driver and by Ray's workers; the manifests hold its commit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMOKE

from inbol_ray.data import io as dio
from inbol_ray.eval.models import registered
from inbol_ray.run_layout import RunLayout
from inbol_ray.schema import MODEL

pytestmark = pytest.mark.integration

TINY_YAML = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_pipeline_stages_and_evaluate_checkpoint_take_a_hub_id(
    ray_local, hub_tiny: str, tmp_path: Path
) -> None:
    from jobs import evaluate_checkpoint
    from jobs import pipeline as pipeline_job

    run = tmp_path / "run"
    common = ["--config", str(TINY_YAML), "--run-dir", str(run), *SMOKE, "model.build_tiny=false",
              "data.shapes.n_train=16", "sampling.engine=transformers"]  # fmt: skip
    assert pipeline_job.main([*common, "model.path=org/tiny", "--until", "sample"]) == 0
    sample = json.loads((run / "manifests" / "sample.json").read_text())
    assert sample["model"] == {"hub": "org/tiny", "commit": hub_tiny}
    assert "model" not in json.loads((run / "manifests" / "prepare.json").read_text())
    assert dio.read_table(str(run / "samples")).num_rows == 16

    argv = [*common, "model.path=org/tiny", "--name", "hub-tiny", "--checkpoint", f"org/tiny@{hub_tiny}"]
    assert evaluate_checkpoint.main(argv) == 0
    predictions = dio.read_table(str(run / "predictions.parquet")).to_pandas()
    assert (predictions[MODEL] == "hub-tiny").sum() > 0
    assert registered(RunLayout(root=str(run)))["hub-tiny"].location == f"org/tiny@{hub_tiny}"
