"""A run directory on object storage: the pipeline at smoke size with `--run-dir s3://bucket/run` against
moto's S3-compatible server (started by the `s3_endpoint` fixture, named by `AWS_ENDPOINT_URL`).

What broke before: the reference stage moved a folder on S3 (no such thing as a folder move there), training
wrote under a local folder literally named `s3:`, and evaluation and Serve opened checkpoints with
`pathlib.Path`. So the checks are: every stage's output is in the bucket, Ray Train's own checkpoints too
(real Ray Train workers, not local mode, since `storage_filesystem` is what reaches S3), nothing named `s3:`
appears on local disk, and a rerun finds every stage up to date from the bucket's manifests. It is also the
pipeline test's second run (DESIGN 1.6: same config, same outputs): other sampling actor counts and batch
sizes, another storage, yet the same samples and the same scores as the session's local smoke run. Serving a run
from the bucket (vLLM replicas loading the base, LoRA adapters and a full checkpoint from `s3://`) is
`tests/integration/test_serve_llm.py`'s app, which serves its run from this server.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from inbol_ray.checkpoint import follow_export
from inbol_ray.data import io as dio
from jobs import pipeline as pipeline_job

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "inbol-test"
RUN = f"s3://{BUCKET}/runs/smoke"
STAGES = [
    "prepare",
    "base_model",
    "sample",
    "construct",
    "reference",
    "train_cadpo",
    "evaluate",
    "report",
]


def test_pipeline_and_serve_on_s3(
    ray_local,
    s3_endpoint: str,
    smoke_pipeline: tuple[Path, list[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    monkeypatch.chdir(tmp_path)  # a stray relative `s3:/...` path would land here
    local_run, smoke, _ = smoke_pipeline
    argv = [
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--run-dir",
        RUN,
        *smoke,
        # One Ray Train worker per training: Ray Train's checkpoints go through storage_filesystem to S3.
        "train.num_workers=1",
        # CA-DPO from the base (its reference): the reference pass and a Ray Train run on S3, one training.
        "train.dpo_init=base",
        "eval.methods=[base,refusal_prompt,cadpo]",
        # Other actor counts and batch sizes than the local smoke run's: nothing may change but speed.
        "sampling.num_actors=1",
        "sampling.batch_size=5",
        "eval.batch_size=7",
        # LoRA, as the LLaVA configs train: the run keeps the base and an adapter, which Serve reads from S3.
        "train.lora=true",
    ]
    assert pipeline_job.main(argv) == 0
    out = capsys.readouterr().out
    assert f"[{len(STAGES)}/{len(STAGES)}] report: done" in out

    for stage in STAGES:
        assert dio.exists(f"{RUN}/manifests/{stage}.json"), stage
    for location in ("metrics.parquet", "predictions.parquet", "report.md", "items", "samples"):
        assert dio.exists(f"{RUN}/{location}"), location
    assert dio.exists(f"{RUN}/tables/cadpo_pairs_ref")
    assert dio.exists(f"{RUN}/models/base/config.json")
    published = follow_export(f"{RUN}/models/cadpo")  # the export the pointer names, files checked
    assert published.startswith(f"{RUN}/models/cadpo/export-")
    assert dio.exists(f"{published}/adapter/adapter_config.json")
    assert not dio.exists(f"{published}/config.json")  # an adapter, no merged copy
    ray_files = dio.list_files(f"{RUN}/models/cadpo/ray")
    assert any("/checkpoint_" in f for f in ray_files), ray_files[:5]
    metrics = dio.read_table(f"{RUN}/metrics.parquet")
    assert set(metrics["method"].to_pylist()) == {"base", "refusal_prompt", "cadpo"}
    assert dio.read_table(f"{RUN}/samples").equals(dio.read_table(str(local_run / "samples")))
    columns = ["method", "dataset", "n", "acc", "refr", "s_trust"]
    local = dio.read_table(str(local_run / "metrics.parquet"), columns=columns).to_pylist()
    untrained = [r for r in local if r["method"] in ("base", "refusal_prompt")]
    assert [r for r in metrics.select(columns).to_pylist() if r["method"] != "cadpo"] == untrained
    assert "| cadpo " in dio.read_bytes(f"{RUN}/report.md").decode()

    for where in (tmp_path, ROOT):
        assert not (where / "s3:").exists(), f"a local folder named 's3:' was written under {where}"

    assert pipeline_job.main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("up to date, skipped") == len(STAGES), again
