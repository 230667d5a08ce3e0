"""The serving app's parts that need no request: agreement scoring, which engine serves, what a checkpoint or
a run is served as, micro-batching, the builder's argument checks, `python -m serve`'s arguments and the
shipped Serve config.

Each is pure or nearly so, so a wrong answer shows here in milliseconds rather than behind a running
deployment; the engine is in test_transformers_engine.py, the ingress' rules in test_llm_serving.py and
test_serve_api.py, the real thing in tests/integration/test_serve.py and test_serve_llm.py.
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
from serve.__main__ import build_args, parse_args
from serve.llm_app import (
    BUILD_ARGS,
    INGRESS_NAME,
    build_llm_app,
    checkpoint_models,
    choose_engine,
    ingress_capacity,
    model_name,
    plan_app,
)
from serve.replica import bind_replica_grpc_to_node_ip
from serve.transformers_server import MicroBatcher

ROOT = Path(__file__).resolve().parents[2]
LLAVA = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}
QWEN = {"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]}


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


# --- which engine, what is served -------------------------------------------------------------------------


def test_choose_engine() -> None:
    def never() -> frozenset[str]:
        raise AssertionError("vLLM's architectures asked for a LLaVA checkpoint")

    assert choose_engine("auto", True, LLAVA, never) == "vllm"
    assert choose_engine("auto", False, LLAVA, never) == "transformers"
    assert choose_engine("transformers", True, QWEN, never) == "transformers"
    assert choose_engine("vllm", True, QWEN, lambda: frozenset(QWEN["architectures"])) == "vllm"
    assert choose_engine("auto", True, QWEN, lambda: frozenset({"LlavaForConditionalGeneration"})) == (
        "transformers"  # an architecture vLLM lacks goes to transformers, as evaluation does
    )
    with pytest.raises(ValueError, match="vLLM is not installed"):
        choose_engine("vllm", False, LLAVA, never)
    with pytest.raises(ValueError, match="engine must be one of"):
        choose_engine("onnx", True, LLAVA, never)


def _model(folder: Path, config: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or LLAVA))
    return folder


def _adapter(folder: Path, base: Path) -> Path:
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(base)})
    )
    return folder


def test_checkpoint_layouts_serve_accepts(tmp_path: Path) -> None:
    """What a deployment loads: `inbol_ray.checkpoint.resolve` on every layout it is given."""
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


def test_a_checkpoint_is_served_under_its_folders_name(tmp_path: Path) -> None:
    assert model_name("/runs/tiny/models/cadpo") == "cadpo"
    assert model_name("s3://bucket/runs/x/models/idk_it/") == "idk_it"
    assert model_name("/runs/x/models/idk_it/adapter") == "idk_it"  # a bare adapter folder: its method
    base = _model(tmp_path / "base")
    served, deployments, _ = checkpoint_models(str(base), None)
    assert [(m.name, m.route, m.deployment, m.adapter) for m in served] == [("base", "base", "base", False)]
    assert deployments == {"base": str(base)}
    adapter = _adapter(tmp_path / "models" / "cadpo", base)
    for location in (str(adapter), f"{adapter}/adapter"):
        served, deployments, root = checkpoint_models(location, None)
        assert [(m.name, m.route, m.deployment) for m in served] == [("cadpo", "base:cadpo", "base")]
        assert deployments == {"base": str(base)} and root == str(tmp_path / "models")  # where vLLM finds it


def test_the_transformers_plan_gives_every_name_a_deployment(tmp_path: Path) -> None:
    """vLLM holds a run's adapters on one deployment of the base; transformers merges each with the base
    in a deployment of its own, and the ingress routes every name to its own."""
    models = tmp_path / "models"
    base = _model(models / "base")
    _adapter(models / "cadpo", base)
    _model(models / "sft")
    overrides = [f"run_dir={tmp_path}", "model.build_tiny=true"]
    vllm = plan_app({"overrides": overrides, "models": ["sft", "cadpo"], "engine": "vllm"})
    assert vllm.engine == "vllm" and set(vllm.deployments) == {"base", "sft"}
    plan = plan_app({"overrides": overrides, "models": ["sft", "cadpo"], "engine": "transformers"})
    assert plan.engine == "transformers"
    assert [(m.name, m.route, m.deployment) for m in plan.served] == [
        (n, n, n) for n in ("base", "sft", "cadpo")
    ]
    assert plan.deployments == {
        "base": str(base),
        "sft": str(models / "sft"),
        "cadpo": str(models / "cadpo" / "adapter"),
    }
    assert plan.bases == {"base": None, "sft": None, "cadpo": str(base)}
    assert plan.model_dir == str(base) and plan.cfg.run_dir == str(tmp_path)


def test_the_builder_checks_its_args(tmp_path: Path) -> None:
    ckpt = _model(tmp_path / "model")
    with pytest.raises(ValueError, match="unknown build_llm_app args"):
        plan_app({"checkpoint": str(ckpt), "checkpiont": "x"})
    with pytest.raises(ValueError, match="not both"):
        plan_app({"checkpoint": str(ckpt), "run_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="pass it with checkpoint"):
        plan_app({"base": str(ckpt), "run_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="engine must be one of"):
        plan_app({"checkpoint": str(ckpt), "engine": "onnx"})
    with pytest.raises(FileNotFoundError):
        plan_app({"checkpoint": str(tmp_path / "missing")})
    plan = plan_app(
        {"checkpoint": str(ckpt), "engine": "transformers", "overrides": ["serve.max_replicas=3"]}
    )
    assert [m.name for m in plan.served] == ["model"] and plan.bases == {"model": None}
    assert plan.cfg.serve.max_replicas == 3
    app = build_llm_app(
        {"checkpoint": str(ckpt), "engine": "transformers", "overrides": ["model.image_aspect=crop"]}
    )
    assert type(app).__name__ == "Application"
    s = (
        Config().serve
    )  # the ingress admits more than its admission limit: the limit's 503 is what clients meet
    assert ingress_capacity(s) == s.max_ongoing_requests + s.max_queued_requests + 32


def test_python_m_serve_arguments() -> None:
    one = parse_args(
        ["--checkpoint", "runs/x/models/cadpo", "--engine", "transformers", "--insecure", "a.b=1"]
    )
    assert one.insecure and build_args(one) == {"config": None, "overrides": ["a.b=1"], "engine": "transformers",
                                                "checkpoint": "runs/x/models/cadpo", "base": None}  # fmt: skip
    run = parse_args(["--run-dir", "runs/x", "--models", "base, cadpo"])
    assert not run.insecure and build_args(run)["models"] == ["base", "cadpo"]
    assert set(build_args(run)) <= set(BUILD_ARGS) and set(build_args(one)) <= set(BUILD_ARGS)
    for bad in (["--checkpoint", "x", "--models", "cadpo"], ["--base", "b"], ["--engine", "onnx"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_python_m_serve_refuses_a_public_host_without_a_key_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from serve.__main__ import main

    monkeypatch.delenv(Config().serve.api_key_env, raising=False)
    # checked first: were Ray started before, connecting to this unroutable address would fail otherwise
    with pytest.raises(SystemExit, match=Config().serve.api_key_env):
        main(["--host", "0.0.0.0", "--checkpoint", "/nowhere", "ray.address=ray://192.0.2.1:10001"])


def test_shipped_serve_config_is_valid_for_serve_deploy() -> None:
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "serve.llm_app:build_llm_app"
    assert set(app.args) <= set(BUILD_ARGS)
    assert (ROOT / app.args["config"]).is_file()
    assert {d.name for d in app.deployments} == {INGRESS_NAME}


def test_trust_remote_code_is_never_enabled() -> None:
    for path in (ROOT / "serve").glob("*.py"):
        assert "trust_remote_code=True" not in path.read_text(), path


# --- replica pieces -----------------------------------------------------------------------------------------


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
