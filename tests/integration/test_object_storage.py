"""A run directory on object storage: the pipeline at smoke size with `--run-dir s3://bucket/run` against
moto's S3-compatible server (started by the `s3_endpoint` fixture, named by `AWS_ENDPOINT_URL`), then the
OpenAI endpoint (ray.serve.llm) serving the run's base and CA-DPO adapter from the bucket.

What broke before: the reference stage moved a folder on S3 (no such thing as a folder move there), training
wrote under a local folder literally named `s3:`, and evaluation and Serve opened checkpoints with
`pathlib.Path`. So the checks are: every stage's output is in the bucket, Ray Train's own checkpoints too
(real Ray Train workers, not local mode, since `storage_filesystem` is what reaches S3), nothing named `s3:`
appears on local disk, a rerun finds every stage up to date from the bucket's manifests, and Serve's vLLM
replica loads the base and the LoRA adapter straight from their `s3://` locations (a node-local cached copy).
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
    assert dio.exists(f"{RUN}/models/cadpo/adapter/adapter_config.json")
    assert not dio.exists(f"{RUN}/models/cadpo/config.json")  # an adapter, no merged copy
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

    from openai import OpenAI
    from ray import serve

    from serve.llm_app import build_llm_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # As cluster/rayservice.yaml does: the run's config, nothing but the bucket's run_dir to find models.
        app = build_llm_app(
            {
                "config": [str(ROOT / "configs" / "tiny.yaml")],
                "overrides": [f"run_dir={RUN}"],
                "models": ["base", "cadpo"],
            }
        )
        serve.run(app, name="inbol", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        ready = requests.get(f"{url}/readyz", timeout=60)
        assert ready.status_code == 200 and ready.json()["models"] == {"base": "ready", "cadpo": "ready"}, (
            ready.text
        )
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        listed = {m.id: m.model_extra["metadata"] for m in client.models.list().data}
        assert listed["cadpo"]["checkpoint"] == f"{RUN}/models/cadpo/adapter"  # served from the bucket
        image = dio.read_table(f"{RUN}/items", columns=["image"])["image"][0].as_py()
        data_url = "data:image/png;base64," + base64.b64encode(image).decode()
        content = [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": "What colour is the circle?"},
        ]
        for model in ("base", "cadpo"):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": content}], max_tokens=6
            )
            assert isinstance(reply.choices[0].message.content, str) and reply.usage.prompt_tokens > 0
    finally:
        serve.shutdown()
