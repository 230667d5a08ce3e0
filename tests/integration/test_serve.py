"""The one serving surface on the transformers engine, for real: the ingress of the vLLM app (the same routes
and rules) in front of a `TransformersServer` deployment, on the session's local Ray, Serve's proxy on
127.0.0.1, driven by the official `openai` client.

The served checkpoint is a LoRA adapter on the tiny checkpoint (random B, so it answers unlike its base),
exported as training exports one and named `idk_it` by its folder: the transformers deployment merges it with
its base in memory. One module-scoped app serves every test; a few test items in the run directory are the
demo's examples. tests/integration/test_serve_llm.py drives the same ingress in front of vLLM. The app runs
with a key (`serve.api_key_env` names a variable only this module sets; it reaches the ingress replica in
its runtime_env, as `serve.llm_app` passes it): every client here sends it, as a user's would.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import secrets
import shutil
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from inbol_ray.config import Config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODEL = "idk_it"
MAX_TOKENS = 6
K = 4
TIMEOUT_S = 120
KEY_ENV = "INBOL_TEST_SERVE_KEY"
KEY = secrets.token_urlsafe(24)
HTTP = requests.Session()
HTTP.headers["Authorization"] = f"Bearer {KEY}"


def build_run(root: Path, tiny_checkpoint: Path, cfg: Config) -> Path:
    """A run directory holding the base, one LoRA adapter (training's export, random B) and test items."""
    import torch

    from inbol_ray.checkpoint import load_model
    from inbol_ray.data import io as dio
    from inbol_ray.data.shapes import generate_items
    from inbol_ray.train.lora import export_model, prepare_policy

    base = root / "models" / "base"
    shutil.copytree(tiny_checkpoint, base)
    model, processor = load_model(str(base))
    policy = prepare_policy(model, dataclasses.replace(cfg.train, lora=True, train_projector=False))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:  # B is zero at init: the adapter would equal the base
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    export_model(policy, processor, str(root / "models" / MODEL), merge=False, base=str(base))
    shapes = dataclasses.replace(cfg.data.shapes, n_pretrain=0, n_train=0, n_val=0, n_id_test=3,
                                 n_ood_test=0, n_unanswerable_test=3)  # fmt: skip
    dio.write_table(generate_items(shapes, cfg.model.image_size), str(root / "items" / "part-0.parquet"))
    return root


@pytest.fixture(scope="module")
def served(
    ray_local, tiny_checkpoint: Path, tiny_config: Config, tmp_path_factory, free_port
) -> Iterator[dict]:
    from ray import serve

    from serve.llm_app import APP_NAME, build_llm_app

    run = build_run(tmp_path_factory.mktemp("serve") / "run", tiny_checkpoint, tiny_config)
    before = sorted(p.name for p in (run / "models" / MODEL).iterdir())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        overrides = [f"run_dir={run}", f"eval.max_new_tokens={MAX_TOKENS}", f"serve.confidence_k={K}",
                     f"sampling.max_new_tokens={MAX_TOKENS}", "serve.max_replicas=1",
                     f"serve.api_key_env={KEY_ENV}"]  # fmt: skip
        os.environ[KEY_ENV] = KEY  # what an operator exports before `python -m serve`
        try:
            app = build_llm_app({"config": str(ROOT / "configs" / "tiny.yaml"), "overrides": overrides,
                                 "checkpoint": str(run / "models" / MODEL), "engine": "transformers"})  # fmt: skip
        finally:
            del os.environ[KEY_ENV]
        start = time.perf_counter()
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"\ntransformers app up in {time.perf_counter() - start:.0f} s")
        yield {"url": f"http://127.0.0.1:{port}", "run": run, "files_before": before}
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(served: dict):
    from openai import OpenAI

    return OpenAI(base_url=served["url"] + "/v1", api_key=KEY, timeout=TIMEOUT_S, max_retries=0)


@pytest.fixture(scope="module")
def items(tiny_config: Config) -> list:
    from inbol_ray.data.shapes import generate

    shapes = dataclasses.replace(tiny_config.data.shapes, n_pretrain=0, n_train=0, n_val=0, n_id_test=3,
                                 n_ood_test=0, n_unanswerable_test=3)  # fmt: skip
    return list(generate(shapes, tiny_config.model.image_size))


def messages(item, text: str | None = None) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(item.image).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text or item.text}]}]  # fmt: skip


def test_the_model_is_listed_and_ready(served: dict, client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert requests.get(served["url"] + "/healthz", timeout=TIMEOUT_S).json() == {"status": "ok"}  # no key
    assert requests.get(served["url"] + "/readyz", timeout=TIMEOUT_S).status_code == 401
    ready = HTTP.get(served["url"] + "/readyz", timeout=TIMEOUT_S)
    assert ready.status_code == 200 and ready.json()["models"] == {MODEL: "ready"}, ready.text


def test_plain_and_streamed_answers_agree_and_carry_usage(client, items) -> None:
    for item in items[:2]:
        plain = client.chat.completions.create(model=MODEL, messages=messages(item), temperature=0,
                                               max_tokens=MAX_TOKENS)  # fmt: skip
        text = plain.choices[0].message.content
        assert plain.usage.prompt_tokens > 0 and 1 <= plain.usage.completion_tokens <= MAX_TOKENS
        assert isinstance(plain.choices[0].model_extra["refused"], bool)
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages(item), temperature=0,
                                                     max_tokens=MAX_TOKENS, stream=True,
                                                     stream_options={"include_usage": True}))  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
        assert last.choices[0].model_extra["refused"] == plain.choices[0].model_extra["refused"]
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_the_served_adapter_answers_as_the_peft_model_with_no_copy_written(
    served: dict, client, items, tiny_checkpoint: Path, tiny_config: Config
) -> None:
    """Greedy answers over HTTP are the unmerged peft model's on the prompt every stage renders: the replica
    merged the adapter in memory and wrote nothing beside it."""
    from peft import PeftModel

    from inbol_ray.checkpoint import adapter_dir, load_model
    from inbol_ray.model.generation import generate_responses
    from inbol_ray.model.prompt import render_prompt

    model, processor = load_model(str(tiny_checkpoint))
    peft_model = PeftModel.from_pretrained(model, adapter_dir(str(served["run"] / "models" / MODEL)))
    prompts = [render_prompt(it.text, None, tiny_config.prompt) for it in items]
    expected = generate_responses(peft_model, processor, [it.image for it in items], prompts,
                                  max_new_tokens=MAX_TOKENS, image_aspect=tiny_config.model.image_aspect)  # fmt: skip
    answers = [client.chat.completions.create(model=MODEL, messages=messages(it), temperature=0,
                                              max_tokens=MAX_TOKENS).choices[0].message.content for it in items]  # fmt: skip
    assert answers == [e[0] for e in expected]
    assert sorted(p.name for p in (served["run"] / "models" / MODEL).iterdir()) == served["files_before"]


def test_n_choices_and_the_confidence_mode(client, items) -> None:
    from inbol_ray.boundary.agreement import answer_agreement

    three = client.chat.completions.create(model=MODEL, messages=messages(items[1]), temperature=1.0, n=3,
                                           max_tokens=MAX_TOKENS, seed=5)  # fmt: skip
    assert [c.index for c in three.choices] == [0, 1, 2] and three.usage.completion_tokens >= 3
    reply = client.chat.completions.create(model=MODEL, messages=messages(items[1]), temperature=1.0, n=K,
                                           max_tokens=MAX_TOKENS, seed=3, extra_body={"confidence": True})  # fmt: skip
    texts = [c.message.content for c in reply.choices]
    conf = reply.model_extra["confidence"]
    assert len(texts) == K and conf["samples"] == texts
    assert conf["agreement"] == answer_agreement(conf["answer"], texts) > 0


def test_the_answer_route_and_the_demo_page(served: dict, items) -> None:
    image = base64.b64encode(items[3].image).decode()
    r = HTTP.post(served["url"] + "/v1/answer", timeout=TIMEOUT_S,
                      json={"image": image, "question": items[3].text, "mode": "confidence"})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL and len(body["samples"]) == K and 0 <= body["confidence"] <= 1
    assert isinstance(body["refused"], bool) and body["latency_ms"] > 0
    root = HTTP.get(served["url"] + "/", timeout=TIMEOUT_S, allow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/demo/"
    page = HTTP.get(served["url"] + "/demo/", timeout=TIMEOUT_S)
    assert page.status_code == 200 and "gradio" in page.text.lower()
    config = HTTP.get(served["url"] + "/demo/config", timeout=TIMEOUT_S)
    assert config.status_code == 200 and "I don't know" in config.text


def test_what_this_engine_cannot_answer_is_a_4xx_in_openais_shape(served: dict, client, items) -> None:
    import openai

    history = [*messages(items[0]), {"role": "assistant", "content": "blue"},
               {"role": "user", "content": "Are you sure?"}]  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="one user message"):
        client.chat.completions.create(model=MODEL, messages=history, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model=MODEL, messages=messages(items[0]), max_tokens=2, logprobs=True)
    r = HTTP.post(served["url"] + "/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=TIMEOUT_S)
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert client.chat.completions.create(model=MODEL, messages=messages(items[0]), max_tokens=2).choices


def test_serve_processes_listen_on_loopback_only(served: dict) -> None:
    """The proxy, controller and replicas (Ray 2.60 replicas open a gRPC server on every interface unless
    `serve.replica` rebinds it) listen on loopback addresses only."""
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
    assert len({c.pid for c in listening}) >= 3  # proxy, controller, engine replica, ingress replica

    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)

    public = [(psutil.Process(c.pid).cmdline()[0], c.laddr) for c in listening if not loopback(c.laddr.ip)]
    assert not public


def test_bounded_load_has_no_5xx(served: dict, items, record_property) -> None:
    """96 requests from 16 concurrent loopback clients on both routes; every 8th is bad input and must stay
    a 4xx."""
    url = served["url"]
    answer = [{"image": base64.b64encode(it.image).decode(), "question": it.text} for it in items]
    chat = [
        {"model": MODEL, "messages": messages(it), "temperature": 0, "max_tokens": MAX_TOKENS} for it in items
    ]

    def one(i: int) -> tuple[int, float]:
        if i % 8 == 7:
            route, body = "/v1/answer", {**answer[0], "question": ""}
        elif i % 2:
            route, body = "/v1/answer", answer[i % len(answer)]
        else:
            route, body = "/v1/chat/completions", chat[i % len(chat)]
        start = time.perf_counter()
        r = requests.post(url + route, json=body, headers=dict(HTTP.headers), timeout=TIMEOUT_S)  # per thread
        return r.status_code, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(96)))
    wall = time.perf_counter() - start
    statuses = [s for s, _ in results]
    ok = sorted(t for s, t in results if s == 200)
    assert not [s for s in statuses if s >= 500]
    assert statuses.count(422) == 96 // 8 and len(ok) == 96 - 96 // 8
    summary = {"requests": 96, "concurrency": 16, "wall_s": round(wall, 2), "req_per_s": round(96 / wall, 1),
               "p50_ms": round(statistics.median(ok) * 1000, 1)}  # fmt: skip
    record_property("load_test", json.dumps(summary))
    print(f"\ntransformers serve load test: {summary}")


def test_the_demo_answers_in_a_browser(served: dict, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, TIMEOUT_S)
    browser.get(served["url"] + "/demo/")  # no key yet: the login form
    key_field = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[name=key]"))[0]
    key_field.send_keys(KEY)
    key_field.submit()  # an HttpOnly cookie for the demo, then the demo itself
    examples = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".gradio-container table tbody tr"))
    assert len(examples) >= 4  # the run's test sets: in-domain and unanswerable
    examples[-1].click()
    question = browser.find_element(By.CSS_SELECTOR, "#question textarea")
    wait.until(lambda d: question.get_attribute("value"))
    browser.find_element(By.CSS_SELECTOR, "#with-confidence input").click()
    browser.find_element(By.CSS_SELECTOR, "#ask").click()
    rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#comparison-table tr[data-model]"))
    assert [r.get_attribute("data-model") for r in rows] == [MODEL]
    assert "error" not in rows[0].text and ("ANSWERED" in rows[0].text or "REFUSED" in rows[0].text)
    assert "%" in rows[0].text  # the confidence column
