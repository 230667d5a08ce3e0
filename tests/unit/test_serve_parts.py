"""The Serve app's parts that need neither a request nor the fake model client: agreement scoring, engine
choice, the checkpoint layouts the deployment loads, micro-batching, `build_app`'s argument checks, the
shipped Serve config, and the Gradio demo's examples and badges.

Each is pure or nearly so, so a wrong answer shows here in milliseconds rather than behind a running
deployment; the routes and request checks are in test_serve_api.py, the real thing in
tests/integration/test_serve.py.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import yaml

from inbol_ray.boundary.agreement import answer_agreement
from inbol_ray.checkpoint import CheckpointError, Resolved, resolve
from inbol_ray.config import Config
from serve.app import BUILD_ARGS, DEPLOYMENT_NAME, INGRESS_NAME, build_app, ingress_capacity, model_name
from serve.gradio_demo import badge_html, confidence_html, demo_examples
from serve.model import MicroBatcher, bind_replica_grpc_to_node_ip, choose_engine

ROOT = Path(__file__).resolve().parents[2]


# --- model deployment pieces -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("greedy", "samples", "expected"),
    [
        ("red", ["Red.", "red", "blue", "the red"], 0.75),  # VQA normalisation: case, period, article
        ("2", ["two", "2", "3"], 2 / 3),  # number words
        ("I don't know.", ["Sorry, I cannot tell.", "red", "I don't know"], 2 / 3),  # refusals agree
        ("red", ["I don't know", "Not sure"], 0.0),
        ("red", [], 0.0),
    ],
)
def test_answer_agreement(greedy: str, samples: list[str], expected: float) -> None:
    assert answer_agreement(greedy, samples) == pytest.approx(expected)


def test_choose_engine() -> None:
    assert choose_engine("auto", gpu=True, vllm_installed=True) == "vllm"
    assert choose_engine("auto", gpu=True, vllm_installed=False) == "transformers"
    assert choose_engine("auto", gpu=False, vllm_installed=True) == "transformers"
    assert choose_engine("vllm", gpu=False, vllm_installed=True) == "vllm"
    with pytest.raises(ValueError, match="engine must be one of"):
        choose_engine("onnx", gpu=False, vllm_installed=False)


def test_checkpoint_layouts_serve_accepts(tmp_path: Path) -> None:
    """What the model deployment loads: `inbol_ray.checkpoint.resolve` on every layout it is given."""
    base = str(tmp_path / "base")
    os.makedirs(base)
    Path(base, "config.json").write_text("{}")
    assert resolve(base) == Resolved(base, None)

    out = tmp_path / "cadpo"  # merged model + adapter/ with no export pointer: which training is which?
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    (out / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds both a full model"):
        resolve(str(out))
    (out / "config.json").unlink()  # LoRA without merge: base + adapter
    assert resolve(str(out)) == Resolved(base, f"{out}/adapter")
    assert resolve(f"{out}/adapter", base=base) == Resolved(base, f"{out}/adapter")

    (out / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nope"}))
    with pytest.raises(FileNotFoundError, match="pass its path as base"):
        resolve(str(out))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        resolve(str(tmp_path / "empty"))


def test_model_name_is_the_last_path_component() -> None:
    assert model_name("/runs/tiny/models/cadpo") == "cadpo"
    assert model_name("s3://bucket/runs/x/models/idk_it/") == "idk_it"


def test_micro_batcher_batches_concurrent_calls_in_order() -> None:
    sizes: list[int] = []

    async def double(items: list[int]) -> list[int]:
        sizes.append(len(items))
        await asyncio.sleep(0.01)
        return [2 * i for i in items]

    async def run() -> list[int]:
        batcher = MicroBatcher(double, max_batch_size=4, wait_s=0.005)
        return list(await asyncio.gather(*(batcher.submit(i) for i in range(10))))

    assert asyncio.run(run()) == [2 * i for i in range(10)]
    assert sizes == [4, 4, 2]


def test_micro_batcher_fails_every_caller_of_a_failed_batch_and_recovers() -> None:
    async def flaky(items: list[int]) -> list[int]:
        if 0 in items:
            raise ValueError("bad batch")
        return items

    async def run() -> tuple[list, int]:
        batcher = MicroBatcher(flaky, max_batch_size=8, wait_s=0.005)
        first = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        return first, await batcher.submit(5)

    first, later = asyncio.run(run())
    assert all(isinstance(r, ValueError) for r in first) and later == 5


def test_grpc_rebinding_is_a_no_op_outside_a_replica() -> None:
    from ray.serve._private import replica

    before = replica.add_port_to_grpc_server
    bind_replica_grpc_to_node_ip()
    assert replica.add_port_to_grpc_server is before


def test_build_app_validates_its_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "model"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="unknown build_app args"):
        build_app({"checkpoint": str(ckpt), "checkpiont": "x"})
    monkeypatch.delenv("INBOL_CHECKPOINT", raising=False)
    with pytest.raises(ValueError, match="INBOL_CHECKPOINT"):
        build_app({})
    with pytest.raises(ValueError, match="engine must be one of"):
        build_app({"checkpoint": str(ckpt), "engine": "onnx"})
    with pytest.raises(FileNotFoundError):
        build_app({"checkpoint": str(tmp_path / "missing")})
    monkeypatch.setenv("INBOL_CHECKPOINT", str(ckpt))  # the RayService manifest's way
    app = build_app({"overrides": ["serve.max_replicas=3"]})
    assert type(app).__name__ == "Application"
    assert (
        ingress_capacity(Config().serve)
        == 2 * Config().serve.max_replicas * Config().serve.max_ongoing_requests
    )


def test_shipped_serve_config_is_valid_for_serve_deploy() -> None:
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app"
    assert set(app.args) <= set(BUILD_ARGS)
    assert (ROOT / app.args["config"]).is_file()
    assert {d.name for d in app.deployments} == {DEPLOYMENT_NAME, INGRESS_NAME}


def test_trust_remote_code_is_never_enabled() -> None:
    for path in (ROOT / "serve").glob("*.py"):
        assert "trust_remote_code=True" not in path.read_text(), path


# --- demo pieces -------------------------------------------------------------------------------------


def test_demo_examples_hold_answerable_and_unanswerable_items(tmp_path: Path) -> None:
    examples = demo_examples(Config(), tmp_path)
    categories = [e.category for e in examples]
    assert {"easy_perception", "hard_perception", "knowledge"} <= set(categories)
    assert categories.count("unanswerable") >= 2
    assert categories.index("unanswerable") > categories.index("knowledge")  # answerable ones first
    for e in examples:
        assert Path(e.image_path).read_bytes()[:4] == b"\x89PNG" and e.question.endswith("?")
        assert e.expected.startswith("unanswerable" if e.category == "unanswerable" else "answer: ")


def test_badge_and_confidence_html() -> None:
    assert "REFUSED" in badge_html(True) and "ANSWERED" in badge_html(False)
    assert "NO ANSWER YET" in badge_html(None)
    html = confidence_html({"confidence": 0.3, "samples": ["a", "<b>"] + ["c"] * 8})
    assert "30%" in html and "3 of 10" in html and "&lt;b&gt;" in html  # model text is escaped
    assert "Estimate confidence" in confidence_html({"answer": "x", "refused": False})
