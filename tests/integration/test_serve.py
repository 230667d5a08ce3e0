"""The Serve app for real: the tiny checkpoint on the session's local Ray, Serve's proxy on 127.0.0.1.

Every route, every kind of bad input (then proof the server still serves), the demo page, and a bounded
load test (200 requests, 16 concurrent, loopback only) with zero 5xx and p50/p99 reported. Plus the
base + adapter path of the model class in-process (no Ray): the merged adapter must answer exactly as
the unmerged peft model does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from inbol_ray.config import Config, load_config
from inbol_ray.data.shapes import generate

pytestmark = pytest.mark.integration

LOAD_REQUESTS = 200
LOAD_CONCURRENCY = 16
TIMEOUT_S = 60


def shapes_items(cfg: Config, n: int = 4) -> list:
    from dataclasses import replace

    shapes = replace(
        cfg.data.shapes, n_pretrain=0, n_train=0, n_val=0, n_id_test=n, n_ood_test=0, n_unanswerable_test=n
    )
    return list(generate(shapes, cfg.model.image_size))


@pytest.fixture(scope="module")
def base_url(ray_local, tiny_checkpoint: Path, tiny_config: Config, free_port) -> Iterator[str]:
    """The app on a free loopback port; Serve is shut down after this module's tests."""
    from ray import serve

    from serve.app import APP_NAME, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        config = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
        app = build_app({"checkpoint": str(tiny_checkpoint), "config": str(config)})
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def image_b64(tiny_config: Config) -> str:
    return base64.b64encode(shapes_items(tiny_config, 1)[0].image).decode()


def post(url: str, body: dict | bytes) -> requests.Response:
    if isinstance(body, bytes):
        return requests.post(url, data=body, headers={"content-type": "application/json"}, timeout=TIMEOUT_S)
    return requests.post(url, json=body, timeout=TIMEOUT_S)


def test_health_readiness_and_models(base_url: str, tiny_checkpoint: Path) -> None:
    assert requests.get(f"{base_url}/healthz", timeout=TIMEOUT_S).json() == {"status": "ok"}
    ready = requests.get(f"{base_url}/readyz", timeout=TIMEOUT_S)
    assert ready.status_code == 200
    assert ready.json()["engine"] == "transformers" and ready.json()["checkpoint"] == str(tiny_checkpoint)
    models = requests.get(f"{base_url}/v1/models", timeout=TIMEOUT_S).json()
    assert models["data"][0]["id"] == tiny_checkpoint.name


def test_answer_and_confidence_modes(base_url: str, image_b64: str, tiny_config: Config) -> None:
    r = post(f"{base_url}/v1/answer", {"image": image_b64, "question": "What colour is the circle?"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"answer", "refused", "latency_ms"}
    assert isinstance(body["answer"], str) and isinstance(body["refused"], bool) and body["latency_ms"] > 0

    r = post(
        f"{base_url}/v1/answer", {"image": image_b64, "question": "How many objects?", "mode": "confidence"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0.0 <= body["confidence"] <= 1.0
    assert len(body["samples"]) == tiny_config.serve.confidence_k


def test_chat_completions(base_url: str, image_b64: str) -> None:
    body = {
        "model": "whatever-the-client-calls-it",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64}},
                    {"type": "text", "text": "What shape is the red object?"},
                ],
            },
        ],
        "temperature": 0,
        "max_tokens": 16,
    }
    r = post(f"{base_url}/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(out["choices"][0]["message"]["content"], str) and isinstance(out["refused"], bool)
    body["temperature"] = 0.8  # a sampled answer goes through the unbatched path
    assert post(f"{base_url}/v1/chat/completions", body).status_code == 200


BAD_REQUESTS = [
    ("/v1/answer", b"{broken", 400, None),
    ("/v1/answer", b"[]", 400, None),
    ("/v1/answer", {"question": "q"}, 422, "image"),
    ("/v1/answer", {"image": "IMG"}, 422, "question"),
    ("/v1/answer", {"image": "IMG", "question": "  "}, 422, "question"),
    ("/v1/answer", {"image": "IMG", "question": ["q"]}, 422, "question"),
    ("/v1/answer", {"image": 12, "question": "q"}, 422, "image"),
    ("/v1/answer", {"image": "IMG", "question": "q", "mode": "maybe"}, 422, "mode"),
    (
        "/v1/answer",
        {"image": base64.b64encode(b"GIF89a but not really").decode(), "question": "q"},
        422,
        "image",
    ),
    ("/v1/answer", {"image": "not*base64", "question": "q"}, 422, "image"),
    ("/v1/answer", {"image": "A" * 13_350_000, "question": "q"}, 413, "image"),  # > max_image_bytes
    ("/v1/answer", {"image": "A" * 14_000_000, "question": "q"}, 413, None),  # > the body limit: not read
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "no image"}]}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True}, 422, "stream"),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD_REQUESTS)
def test_bad_input_is_4xx_json_naming_the_problem(
    base_url: str, image_b64: str, route: str, body: dict | bytes, status: int, param: str | None
) -> None:
    if isinstance(body, dict) and body.get("image") == "IMG":
        body = {**body, "image": image_b64}
    r = post(base_url + route, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"]
    assert err["param"] == param


def test_server_keeps_serving_after_bad_input(base_url: str, image_b64: str) -> None:
    for route, body, _, _ in BAD_REQUESTS[:4]:
        post(base_url + route, body)
    assert requests.get(f"{base_url}/readyz", timeout=TIMEOUT_S).status_code == 200
    assert post(f"{base_url}/v1/answer", {"image": image_b64, "question": "q"}).status_code == 200


def test_serve_processes_listen_on_loopback_only(base_url: str) -> None:
    """The proxy, controller and replicas (Ray 2.60 replicas open a gRPC server on every interface unless
    serve.app rebinds it) listen on loopback addresses only."""
    import ipaddress

    import psutil

    serve_pids = {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.cmdline() and p.cmdline()[0].startswith(("ray::Serve", "ray::ProxyActor"))
    }
    listening = [
        c
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in serve_pids
    ]
    assert len({c.pid for c in listening}) >= 3  # proxy, controller, model replica, ingress replica

    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)

    public = [(psutil.Process(c.pid).cmdline()[0], c.laddr) for c in listening if not loopback(c.laddr.ip)]
    assert not public


def test_demo_is_served_from_serve(base_url: str) -> None:
    root = requests.get(f"{base_url}/", timeout=TIMEOUT_S, allow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/demo/"
    page = requests.get(f"{base_url}/demo/", timeout=TIMEOUT_S)
    assert page.status_code == 200 and "gradio" in page.text.lower()
    config = requests.get(f"{base_url}/demo/config", timeout=TIMEOUT_S)
    assert config.status_code == 200 and "Refusal-aware" in config.text


def test_bounded_load_has_no_5xx(base_url: str, image_b64: str, tiny_config: Config, record_property) -> None:
    """200 requests from 16 concurrent loopback clients; every 10th is bad input and must stay a 4xx."""
    items = shapes_items(tiny_config)
    bodies = [
        {"image": base64.b64encode(it.image).decode(), "question": it.text, "mode": "answer"} for it in items
    ]

    def one(i: int) -> tuple[int, float]:
        body = {"image": image_b64, "question": ""} if i % 10 == 9 else bodies[i % len(bodies)]
        start = time.perf_counter()
        r = requests.post(f"{base_url}/v1/answer", json=body, timeout=TIMEOUT_S)
        return r.status_code, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(LOAD_CONCURRENCY) as pool:
        results = list(pool.map(one, range(LOAD_REQUESTS)))
    wall = time.perf_counter() - start
    statuses = [s for s, _ in results]
    ok = sorted(t for s, t in results if s == 200)
    assert not [s for s in statuses if s >= 500]
    assert statuses.count(422) == LOAD_REQUESTS // 10
    assert len(ok) == LOAD_REQUESTS - LOAD_REQUESTS // 10
    p50 = statistics.median(ok) * 1000
    p99 = ok[min(len(ok) - 1, round(0.99 * len(ok)))] * 1000
    summary = {
        "requests": LOAD_REQUESTS,
        "concurrency": LOAD_CONCURRENCY,
        "wall_s": round(wall, 2),
        "req_per_s": round(LOAD_REQUESTS / wall, 1),
        "p50_ms": round(p50, 1),
        "p99_ms": round(p99, 1),
    }
    record_property("load_test", json.dumps(summary))
    print(f"\nserve load test: {summary}")


def test_adapter_checkpoint_answers_like_the_peft_model_with_no_copy_written(
    tmp_path: Path, tiny_checkpoint: Path, tiny_config: Config
) -> None:
    """base + peft adapter (the LoRA-without-merge training output), served by the plain model class."""
    import torch
    from peft import LoraConfig, get_peft_model

    from inbol_ray.checkpoint import load_model
    from inbol_ray.model.generation import generate_responses
    from inbol_ray.model.prompt import render_prompt
    from serve.model import RefusalAwareModel

    model, processor = load_model(str(tiny_checkpoint))
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=tiny_config.train.lora_target)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-trivial adapter: B is zero at init, which would merge to the base
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    out = tmp_path / "run" / "models" / "idk_it"
    peft_model.save_pretrained(out / "adapter")
    items = shapes_items(tiny_config, 2)
    images, questions = [it.image for it in items], [it.text for it in items]
    prompts = [render_prompt(q) for q in questions]  # as Serve renders them
    expected = [r[0] for r in generate_responses(peft_model, processor, images, prompts, max_new_tokens=6)]

    cfg = load_config(None, ["eval.max_new_tokens=6"])
    served = RefusalAwareModel(str(out), cfg, base=str(tiny_checkpoint))
    try:
        assert served.adapter == f"{out}/adapter"

        async def ask() -> list[dict]:
            return list(
                await asyncio.gather(*(served.answer(i, q) for i, q in zip(images, questions, strict=True)))
            )

        before = set(Path(tempfile.gettempdir()).iterdir())
        answers = asyncio.run(ask())
        assert [a["answer"] for a in answers] == expected
    finally:
        served.close()
    written = [p for p in set(Path(tempfile.gettempdir()).iterdir()) - before if "merged" in p.name]
    assert written == [] and sorted(p.name for p in out.iterdir()) == ["adapter"]  # no merged copy anywhere
