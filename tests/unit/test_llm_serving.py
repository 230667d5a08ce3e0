"""The pure parts of the ray.serve.llm route, without Ray: which models a run serves and how each
deployment is configured (`serve/llm_app.py`), and the ingress' request and response rules
(`serve/llm_ingress.py`). The integration test drives the same code through the real endpoint."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from inbol_ray.config import load_config
from inbol_ray.model.prompt import render_prompt
from inbol_ray.run_layout import RunLayout
from serve.api import ApiError, Limits
from serve.chat_rules import (
    annotate,
    annotate_stream,
    check_chat_images,
    confidence_of,
    render_last_user_turn,
)
from serve.llm_app import cpu_share, llm_config, served_models

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "configs" / "tiny.yaml")


def _adapter(folder: Path, base: Path, rank: int = 8) -> None:
    (folder / "adapter").mkdir(parents=True)
    config = {"r": rank, "base_model_name_or_path": str(base), "peft_type": "LORA"}
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(config))


def _model(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")


def test_a_run_serves_adapters_on_its_base_and_full_models_apart(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _model(models / "base")
    _adapter(models / "idk_it", models / "base")
    _adapter(models / "cadpo", models / "base")
    _model(models / "sft")
    served, deployments = served_models(
        RunLayout(str(tmp_path), build_tiny=True), ["base", "sft", "idk_it", "cadpo"]
    )
    assert [(m.name, m.route, m.deployment, m.adapter) for m in served] == [
        ("base", "base", "base", False),
        ("sft", "sft", "sft", False),
        ("idk_it", "base:idk_it", "base", True),
        ("cadpo", "base:cadpo", "base", True),
    ]
    assert deployments == {"base": str(models / "base"), "sft": str(models / "sft")}
    with pytest.raises(FileNotFoundError, match="model 'dpo1': no checkpoint"):
        served_models(RunLayout(str(tmp_path), build_tiny=True), ["dpo1"])
    with pytest.raises(ValueError, match="not a trained method"):
        served_models(RunLayout(str(tmp_path), build_tiny=True), ["refusal_prompt"])
    _model(tmp_path / "elsewhere")
    _adapter(models / "dpo2", tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="not on the run's base"):
        served_models(RunLayout(str(tmp_path), build_tiny=True), ["dpo2"])


def test_a_tiny_run_served_without_its_config_is_refused(tmp_path: Path) -> None:
    """Without the run's config `base` resolves to `model.path`: for a run that trained its own base, the
    untrained init. The run's base_model manifest gives it away."""
    _model(tmp_path / "models" / "base")
    untrained = RunLayout(str(tmp_path), model_path=str(tmp_path / "model" / "init"), build_tiny=False)
    assert served_models(untrained, ["base"])[1] == {"base": str(tmp_path / "model" / "init")}  # no manifest
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "base_model.json").write_text("{}")
    with pytest.raises(ValueError, match="trained its own base model .* pass the run's config"):
        served_models(untrained, ["base"])
    assert served_models(RunLayout(str(tmp_path), build_tiny=True), ["base"])[1] == {
        "base": str(tmp_path / "models" / "base")
    }


def test_cpu_replicas_shrink_to_fit_the_cluster(cfg) -> None:
    assert cpu_share(cfg, deployments=1, cluster_cpus=16) == cfg.sampling.cpus_per_actor
    assert cpu_share(cfg, deployments=2, cluster_cpus=2) == 0.5  # max_replicas 2 each
    assert cpu_share(cfg, deployments=7, cluster_cpus=2) == 0.14  # the tiny default's seven full models


def test_deployment_config_on_cpu_and_gpu(cfg, tmp_path: Path) -> None:
    _adapter(tmp_path / "a", tmp_path, rank=12)
    _adapter(tmp_path / "b", tmp_path, rank=4)
    cpu = llm_config(
        "base", str(tmp_path), cfg, [str(tmp_path / "a" / "adapter"), str(tmp_path / "b" / "adapter")], 0.5
    )
    kwargs = cpu.engine_kwargs
    assert kwargs["enable_lora"] and kwargs["max_loras"] == 2 and kwargs["max_lora_rank"] == 16
    assert kwargs["enforce_eager"] and "model" not in kwargs and "disable_log_stats" not in kwargs
    assert cpu.placement_group_config == {"bundles": [{"CPU": 0.5}]}
    assert cpu.runtime_env["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert cpu.lora_config.max_num_adapters_per_replica == 2
    assert cpu.deployment_config["autoscaling_config"]["max_replicas"] == cfg.serve.max_replicas
    gpu_cfg = load_config(ROOT / "configs" / "llava-1.5-7b.yaml", ["sampling.accelerator_type=L40S"])
    gpu = llm_config("base", str(tmp_path), gpu_cfg)
    assert gpu.accelerator_type == "L40S" and gpu.placement_group_config is None
    assert gpu.engine_kwargs["gpu_memory_utilization"] == gpu_cfg.sampling.gpu_memory_utilization
    assert gpu.lora_config is None


@pytest.fixture(scope="module")
def tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_chat_images_one_data_url_that_decodes(cfg, tiny_png: bytes) -> None:
    limits = Limits.from_config(cfg)
    part = {"type": "image_url", "image_url": {"url": _url(tiny_png)}}
    check_chat_images([{"role": "user", "content": [part, {"type": "text", "text": "q"}]}], limits)
    check_chat_images([{"role": "user", "content": "text only"}], limits)  # no image: a text question
    for content, message in (
        ([part, part], "at most one image_url"),
        ([{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}], "data: URL"),
        ([{"type": "image_url", "image_url": {"url": _url(b"not an image")}}], "image"),
    ):
        with pytest.raises(ApiError, match=message) as err:
            check_chat_images([{"role": "user", "content": content}], limits)
        assert err.value.status == 422


def test_only_the_last_user_turn_is_rendered(cfg) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "x"}},
                {"type": "text", "text": "What is it?"},
            ],
        },
        {"role": "assistant", "content": "a cube"},
        {"role": "user", "content": "What colour is it?"},
    ]
    render_last_user_turn(messages, cfg)
    assert messages[3]["content"] == render_prompt("What colour is it?", None, cfg.prompt)
    assert messages[1]["content"][1]["text"] == "What is it?" and messages[0]["content"] == "Be brief."
    again = [{"role": "user", "content": messages[3]["content"]}]
    render_last_user_turn(again, cfg)
    assert again[0]["content"] == messages[3]["content"]  # already rendered: left alone
    with pytest.raises(ApiError, match="no user message"):
        render_last_user_turn([{"role": "assistant", "content": "hi"}], cfg)


def test_responses_say_refused_and_confidence_reads_the_samples() -> None:
    result = {"choices": [{"index": 0, "message": {"content": "I don't know."}}, {"index": 1, "message": {"content": "red"}},
                          {"index": 2, "message": {"content": "Red."}}]}  # fmt: skip
    out = annotate(result, "What colour is the cube?", confidence=True)
    assert [c["refused"] for c in out["choices"]] == [True, False, False]
    conf = out["confidence"]
    assert conf["answer"].lower().strip(".") == "red" and conf["agreement"] == pytest.approx(2 / 3)
    assert not conf["refused"] and conf["samples"] == ["I don't know.", "red", "Red."]
    refusing = confidence_of(["I don't know.", "I'm not sure.", "blue"])
    assert refusing["refused"] and refusing["agreement"] == pytest.approx(2 / 3)


def test_the_stream_gets_refused_on_each_choices_last_chunk() -> None:
    events = [
        {"choices": [{"index": 0, "delta": {"content": "I don't"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": " know."}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"completion_tokens": 4}},
    ]
    text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    async def chunks():  # split mid-event, as a network would
        for i in range(0, len(text), 17):
            yield text[i : i + 17]

    async def collect() -> str:
        return "".join([c async for c in annotate_stream(chunks(), "What is it?")])

    out = asyncio.run(collect())
    parsed = [json.loads(e[6:]) for e in out.split("\n\n") if e.startswith("data: {")]
    assert "refused" not in parsed[0]["choices"][0] and parsed[1]["choices"][0]["refused"] is True
    assert parsed[2]["usage"] == {"completion_tokens": 4} and out.endswith("data: [DONE]\n\n")
