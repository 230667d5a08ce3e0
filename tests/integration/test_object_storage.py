"""A run directory on object storage: the pipeline at smoke size with `--run-dir s3://bucket/run` against
moto's S3-compatible server (started by the `s3_endpoint` fixture, named by `AWS_ENDPOINT_URL`), then Serve
answering from a checkpoint in the bucket.

What broke before: the reference stage moved a folder on S3 (no such thing as a folder move there), training
wrote under a local folder literally named `s3:`, and evaluation and Serve opened checkpoints with
`pathlib.Path`. So the checks are: every stage's output is in the bucket, Ray Train's own checkpoints too
(real Ray Train workers, not local mode, since `storage_filesystem` is what reaches S3), nothing named `s3:`
appears on local disk, a rerun finds every stage up to date from the bucket's manifests, and a Serve replica
loads a trained model straight from its `s3://` location.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import requests

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
    free_port,
    s3_endpoint: str,
    smoke_run: tuple[Path, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    monkeypatch.chdir(tmp_path)  # a stray relative `s3:/...` path would land here
    _, smoke = smoke_run
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
        "eval.methods=[base,cadpo]",
    ]
    assert pipeline_job.main(argv) == 0
    out = capsys.readouterr().out
    assert f"[{len(STAGES)}/{len(STAGES)}] report: done" in out

    for stage in STAGES:
        assert dio.exists(f"{RUN}/manifests/{stage}.json"), stage
    for location in ("metrics.parquet", "predictions.parquet", "report.md", "items", "samples"):
        assert dio.exists(f"{RUN}/{location}"), location
    assert dio.exists(f"{RUN}/tables/cadpo_pairs_ref")
    for method in ("base", "cadpo"):
        assert dio.exists(f"{RUN}/models/{method}/config.json"), method
    ray_files = dio.list_files(f"{RUN}/models/cadpo/ray")
    assert any("/checkpoint_" in f for f in ray_files), ray_files[:5]
    metrics = dio.read_table(f"{RUN}/metrics.parquet")
    assert set(metrics["method"].to_pylist()) == {"base", "cadpo"}
    assert "| cadpo " in dio.read_bytes(f"{RUN}/report.md").decode()

    for where in (tmp_path, ROOT):
        assert not (where / "s3:").exists(), f"a local folder named 's3:' was written under {where}"

    assert pipeline_job.main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("up to date, skipped") == len(STAGES), again

    from ray import serve

    from serve.app import APP_NAME, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        checkpoint = f"{RUN}/models/cadpo"
        # As cluster/rayservice.yaml does: the run's config and a method, no checkpoint path of its own.
        app = build_app(
            {
                "config": [str(ROOT / "configs" / "tiny.yaml")],
                "overrides": [f"run_dir={RUN}"],
                "method": "cadpo",
            }
        )
        serve.run(app, name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        ready = requests.get(f"{url}/readyz", timeout=60)
        assert ready.status_code == 200 and ready.json()["checkpoint"] == checkpoint, ready.text
        models = requests.get(f"{url}/v1/models", timeout=60).json()
        assert [m["id"] for m in models["data"]] == ["cadpo"]
        image = dio.read_table(f"{RUN}/items", columns=["image"])["image"][0].as_py()
        r = requests.post(
            f"{url}/v1/answer",
            json={"image": base64.b64encode(image).decode(), "question": "What colour is the circle?"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["answer"], str)
    finally:
        serve.shutdown()
