"""Every method of a run behind one OpenAI-compatible endpoint on Ray's LLM stack (vLLM on CPU), driven
by the official `openai` client, Serve's proxy on 127.0.0.1.

The run is built here the way training writes one: the tiny checkpoint as `models/base`, two LoRA adapters
(`idk_it`, `cadpo`: `export_model` of a peft policy whose B matrices are random, so each answers
differently) and one full fine-tuned checkpoint (`sft`), plus a few test items for the demo's examples.
It is then copied to object storage (moto's S3 server, the session's `s3_endpoint`) and served from there,
as `cluster/rayservice.yaml` serves a run: `run_dir=s3://...` is all the app is told, and its vLLM replicas
load the base, the adapters and the full checkpoint from their `s3://` locations (a node-local cached
copy). One module-scoped app serves all of them (two vLLM deployments: the base with its adapters, and
`sft`). The local copy of the run is what the endpoint-evaluation test writes its tables into.

The app runs with a key (`serve.api_key_env` names a variable only this module sets), so every test is a
keyed client, and the hostile-request tests attack it as a stranger would: without the key, with parts
that would make the engine fetch a URL (a loopback server records that nothing did), over the caps, with
a body that never ends, a 40-Mpixel image, a cross-origin preflight and more requests than it may hold.
The ingress replica reads the key from its environment at start: the session's Ray is usually up before
this module (other modules start it) and its workers keep the environment Ray started with, so the key
reaches the ingress through its deployment's runtime_env (`with_env`), as an operator's Secret reaches it
through the pod's environment.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import secrets
import select
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from inbol_ray.config import Config
from inbol_ray.data.shapes import generate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODELS = ["base", "sft", "idk_it", "cadpo"]
BUCKET = "inbol-llm-test"
TIMEOUT_S = 120
MAX_TOKENS = 8
KEY_ENV = "INBOL_TEST_LLM_SERVE_KEY"
KEY = secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {KEY}"}
ONGOING, QUEUED = 16, 24
"""serve.max_ongoing_requests (the default) and serve.max_queued_requests: the ingress holds 40 model
requests at once, room for the 32 clients' test and few enough to fill for the queue-full test."""


def _randomised(policy, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:  # B is zero at init: the adapter would equal the base
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def build_run(root: Path, tiny_checkpoint: Path, cfg: Config, served_from: str = "") -> Path:
    """A run directory as training leaves it: base, LoRA adapters and a full checkpoint, plus test items.
    `served_from`: where the run will be read from (the bucket), which the adapters record as their base's
    parent, as training records the run's own base URI."""
    import dataclasses

    import torch

    from inbol_ray.checkpoint import load_model
    from inbol_ray.data import io as dio
    from inbol_ray.data.shapes import generate_items
    from inbol_ray.train.lora import export_model, prepare_policy

    base = root / "models" / "base"
    shutil.copytree(tiny_checkpoint, base)
    for seed, method in enumerate(("idk_it", "cadpo")):
        model, processor = load_model(str(base))
        policy = prepare_policy(model, dataclasses.replace(cfg.train, lora=True, train_projector=False))
        _randomised(policy, seed)
        recorded = f"{served_from}/models/base" if served_from else str(base)
        export_model(policy, processor, str(root / "models" / method), merge=False, base=recorded)
    model, processor = load_model(str(base))
    with torch.no_grad():  # a full fine-tune: every LM weight moved a little
        gen = torch.Generator().manual_seed(7)
        for name, p in model.named_parameters():
            if "language_model" in name and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    export_model(model, processor, str(root / "models" / "sft"), merge=False)
    shapes = dataclasses.replace(cfg.data.shapes, n_pretrain=0, n_train=0, n_val=0, n_id_test=4,
                                 n_ood_test=2, n_unanswerable_test=4)  # fmt: skip
    dio.write_table(generate_items(shapes, cfg.model.image_size), str(root / "items" / "part-0.parquet"))
    return root


def with_env(app: Any, env: dict[str, str]) -> Any:
    """The app with `env` in its ingress replica's environment (the deployment's runtime_env)."""
    ingress = app._bound_deployment
    actor = dict(ingress.ray_actor_options or {})
    runtime_env = dict(actor.get("runtime_env") or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    actor["runtime_env"] = runtime_env
    return ingress.options(ray_actor_options=actor).bind(*ingress.init_args, **ingress.init_kwargs)


@pytest.fixture(scope="module")
def served(
    ray_local, s3_endpoint: str, tiny_checkpoint: Path, tiny_config: Config, tmp_path_factory, free_port
) -> Iterator[dict]:
    import boto3
    from ray import serve

    from inbol_ray.checkpoint import upload_dir
    from serve.llm_app import build_llm_app

    bucket_run = f"s3://{BUCKET}/runs/llm"
    run = build_run(
        tmp_path_factory.mktemp("llm") / "run", tiny_checkpoint, tiny_config, served_from=bucket_run
    )
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    upload_dir(str(run), bucket_run)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_ENV, KEY)  # this process' clients (the endpoint evaluation) send it from here
        try:
            overrides = [
                "sampling.cpus_per_actor=0.5",  # two deployments beside the session's other actors on 2 CPUs
                f"eval.max_new_tokens={MAX_TOKENS}",
                "serve.confidence_k=4",
                f"serve.api_key_env={KEY_ENV}",
                f"serve.max_ongoing_requests={ONGOING}",
                f"serve.max_queued_requests={QUEUED}",
            ]
            app = build_llm_app({"config": str(ROOT / "configs" / "tiny.yaml"), "overrides": overrides,
                                 "run_dir": bucket_run, "models": MODELS})  # fmt: skip
            start = time.perf_counter()
            serve.run(with_env(app, {KEY_ENV: KEY}), name="inbol-llm", route_prefix="/")
            print(f"\nllm app up in {time.perf_counter() - start:.0f} s")
            yield {"url": f"http://127.0.0.1:{port}", "run": run, "bucket_run": bucket_run}
        finally:
            serve.shutdown()


@pytest.fixture(scope="module")
def client(served: dict):
    from openai import OpenAI

    return OpenAI(base_url=served["url"] + "/v1", api_key=KEY, timeout=TIMEOUT_S, max_retries=0)


@pytest.fixture()
def fetch_trap() -> Iterator[dict]:
    """A loopback HTTP server that records every request: the URL a hostile part asks the server to fetch."""
    hits: list[str] = []

    class Record(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Record)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{server.server_port}/x.png", "hits": hits}
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def items(tiny_config: Config) -> list:
    import dataclasses

    shapes = dataclasses.replace(tiny_config.data.shapes, n_pretrain=0, n_train=0, n_val=0, n_id_test=3,
                                 n_ood_test=0, n_unanswerable_test=3)  # fmt: skip
    return list(generate(shapes, tiny_config.model.image_size))


def messages(item, text: str | None = None) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(item.image).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text or item.text}]}]  # fmt: skip


def test_every_method_is_listed_and_ready(served: dict, client) -> None:
    listed = client.models.list().data
    assert [m.id for m in listed] == MODELS
    assert all(
        set(m.model_dump(exclude_none=True)) == {"id", "object", "created", "owned_by"} for m in listed
    )
    raw = requests.get(served["url"] + "/v1/models", headers=AUTH, timeout=TIMEOUT_S).text
    one = requests.get(served["url"] + "/v1/models/cadpo", headers=AUTH, timeout=TIMEOUT_S).json()
    assert one == {"id": "cadpo", "object": "model", "created": one["created"], "owned_by": "inbol-ray"}
    for secret in (BUCKET, "s3://", "adapter", "base:cadpo", str(served["run"])):  # names, not storage
        assert secret not in raw, secret
    ready = requests.get(served["url"] + "/readyz", headers=AUTH, timeout=TIMEOUT_S)
    assert ready.status_code == 200 and ready.json()["models"] == dict.fromkeys(MODELS, "ready")


def test_streaming_equals_the_plain_greedy_answer_and_usage_is_filled(client, items) -> None:
    for item in items[:3]:
        plain = client.chat.completions.create(model="cadpo", messages=messages(item), temperature=0,
                                               max_tokens=MAX_TOKENS)  # fmt: skip
        text = plain.choices[0].message.content
        assert text and plain.usage.prompt_tokens > 0 and plain.usage.completion_tokens > 0
        assert isinstance(plain.choices[0].model_extra["refused"], bool)
        stream = client.chat.completions.create(model="cadpo", messages=messages(item), temperature=0,
                                                max_tokens=MAX_TOKENS, stream=True,
                                                stream_options={"include_usage": True})  # fmt: skip
        chunks = list(stream)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
        assert last.choices[0].model_extra["refused"] == plain.choices[0].model_extra["refused"]
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_the_model_field_picks_the_method(client, items) -> None:
    answers = {
        model: [client.chat.completions.create(model=model, messages=messages(it), temperature=0,
                                               max_tokens=MAX_TOKENS).choices[0].message.content
                for it in items]
        for model in MODELS
    }  # fmt: skip
    assert len({tuple(a) for a in answers.values()}) == len(MODELS), answers  # four different models
    again = client.chat.completions.create(model="base:idk_it", messages=messages(items[0]), temperature=0,
                                           max_tokens=MAX_TOKENS)  # fmt: skip
    assert again.choices[0].message.content == answers["idk_it"][0]  # Ray's id routes to the same adapter


def test_prompt_is_the_projects_and_history_is_kept(client, items, tiny_config: Config) -> None:
    """The last user turn is rendered as sampled and evaluated (short-answer instruction): sending it
    rendered already gives the same answer; a system message and an earlier turn lengthen the prompt."""
    from inbol_ray.model.prompt import render_prompt

    item = items[0]
    bare = client.chat.completions.create(
        model="idk_it", messages=messages(item), temperature=0, max_tokens=4
    )
    rendered = client.chat.completions.create(model="idk_it", messages=messages(item, render_prompt(item.text)),
                                              temperature=0, max_tokens=4)  # fmt: skip
    assert bare.choices[0].message.content == rendered.choices[0].message.content
    assert bare.usage.prompt_tokens == rendered.usage.prompt_tokens
    history = [{"role": "system", "content": "You answer questions about pictures."}, *messages(item),
               {"role": "assistant", "content": "blue"}, {"role": "user", "content": "Are you sure?"}]  # fmt: skip
    longer = client.chat.completions.create(model="idk_it", messages=history, temperature=0, max_tokens=4)
    assert longer.usage.prompt_tokens > bare.usage.prompt_tokens


def test_n_samples_and_the_confidence_mode(client, items) -> None:
    from inbol_ray.boundary.agreement import answer_agreement

    reply = client.chat.completions.create(model="cadpo", messages=messages(items[1]), temperature=1.0, n=4,
                                           max_tokens=MAX_TOKENS, seed=3, extra_body={"confidence": True})  # fmt: skip
    texts = [c.message.content for c in reply.choices]
    assert len(texts) == 4 and reply.usage.completion_tokens > 0
    conf = reply.model_extra["confidence"]
    assert conf["samples"] == texts
    assert conf["agreement"] == answer_agreement(conf["answer"], texts) > 0
    stop = client.chat.completions.create(model="cadpo", messages=messages(items[1]), temperature=0,
                                          max_tokens=MAX_TOKENS, stop=[" "])  # fmt: skip
    assert " " not in stop.choices[0].message.content


def test_no_key_or_a_wrong_key_is_401_and_healthz_is_open(served: dict, items) -> None:
    import openai

    for key in ("wrong-key", KEY[:-1]):
        stranger = openai.OpenAI(
            base_url=served["url"] + "/v1", api_key=key, timeout=TIMEOUT_S, max_retries=0
        )
        with pytest.raises(openai.AuthenticationError):
            stranger.chat.completions.create(model="cadpo", messages=messages(items[0]), max_tokens=1)
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
    for method, path in (("post", "/v1/chat/completions"), ("post", "/v1/answer"), ("get", "/v1/models"),
                         ("get", "/readyz"), ("get", "/demo/config"), ("post", "/v1/completions")):  # fmt: skip
        r = requests.request(method, served["url"] + path, json={}, timeout=TIMEOUT_S)
        assert r.status_code == 401 and r.json()["error"]["code"] == 401, (path, r.text)
    assert requests.get(served["url"] + "/healthz", timeout=TIMEOUT_S).json() == {"status": "ok"}


def post(served: dict, path: str, **kwargs: Any) -> requests.Response:
    return requests.post(served["url"] + path, headers={**AUTH, **kwargs.pop("headers", {})}, timeout=TIMEOUT_S,
                         **kwargs)  # fmt: skip


def big_png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")  # 40 Mpixel in a few KB
    return buf.getvalue()


def test_hostile_requests_get_4xx_and_nothing_reaches_the_engine(
    served: dict, client, items, fetch_trap
) -> None:
    """Each request is refused at the ingress in OpenAI's error shape; none makes the server fetch the
    trap's URL (vLLM's parser would, for every image shape below but the data: URL), and the server keeps
    answering."""
    import openai

    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-4", messages=messages(items[0]))
    trap = fetch_trap["url"]
    good = messages(items[0])
    image, question = good[0]["content"]

    def user(*parts: dict) -> list[dict]:
        return [{"role": "user", "content": list(parts)}]

    huge = "data:image/png;base64," + base64.b64encode(big_png(8000, 5000)).decode()
    not_image = "data:image/png;base64," + base64.b64encode(b"not a png").decode()
    bad = [
        (user({"image_url": trap}, question), 422, "messages[0].content[0]"),  # untyped: vLLM fetches it
        (user({"type": "input_image", "image_url": trap}, question), 422, "messages[0].content[0]"),
        (user({"type": "input_image", "image_url": {"url": trap}}, question), 422, "messages[0].content[0]"),
        (user({"type": "image_url", "image_url": {"url": trap}}, question), 422, "messages[0].content[0]"),
        (user({"type": "image_url", "image_url": trap}, question), 422, "messages[0].content[0]"),
        (user({"type": "video_url", "video_url": {"url": trap}}, question), 422, "messages[0].content[0]"),
        (user({"type": "audio_url", "audio_url": {"url": trap}}, question), 422, "messages[0].content[0]"),
        ([{"role": "system", "content": [{"image_url": trap}]}, *good], 422, "messages[0].content[0]"),
        ([*good, {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": trap}}]}], 422,
         "messages[1].content[0]"),
        (user(image, image, question), 422, "messages"),  # two images
        (user({"type": "image_url", "image_url": {"url": huge}}, question), 413, "messages"),  # 40 Mpixel
        (user({"type": "image_url", "image_url": {"url": not_image}}, question), 422, "messages"),
        ([{"role": "assistant", "content": "hi"}], 422, "messages"),
        ("hello", 422, "messages"),
    ]  # fmt: skip
    for content, status, param in bad:
        r = post(served, "/v1/chat/completions", json={"model": "cadpo", "messages": content})
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), (param, r.text)
    over = [
        ({"n": 10000}, "n"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
        ({"ignore_eos": True}, "ignore_eos"),
        ({"min_tokens": 100}, "min_tokens"),
        ({"chat_template": "{{ 7 * 7 }}"}, "chat_template"),
        ({"n": 1, "confidence": True}, "n"),
        ({"n": 2, "confidence": True, "stream": True}, "stream"),
    ]
    for extra, param in over:
        r = post(served, "/v1/chat/completions", json={"model": "cadpo", "messages": good, **extra})
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
    for prompt in ([1, 2, 3], ["a", "b"], "a string"):  # /v1/completions is closed, whatever its prompt
        r = post(served, "/v1/completions", json={"model": "cadpo", "prompt": prompt, "max_tokens": 10**6})
        assert r.status_code == 404 and "chat/completions" in r.json()["error"]["message"]
    r = post(
        served, "/v1/answer", json={"image": base64.b64encode(big_png(8000, 5000)).decode(), "question": "q"}
    )
    assert r.status_code == 413 and "max_image_pixels" in r.json()["error"]["message"]
    for body, status in (
        ({"model": "cadpo"}, 422),
        ({"model": "cadpo", "messages": good, "temperature": "hot"}, 400),
    ):
        r = post(served, "/v1/chat/completions", json=body)
        assert r.status_code == status and r.json()["error"]["message"], r.text
    for path in ("/v1/models/nope", "/no/such/route"):
        r = requests.get(served["url"] + path, headers=AUTH, timeout=TIMEOUT_S)
        assert r.status_code == 404 and r.json()["error"]["message"]
    r = post(served, "/v1/chat/completions", data=b"{not json", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and r.json()["error"]["message"]
    assert fetch_trap["hits"] == []  # nothing fetched the trap
    assert client.chat.completions.create(model="cadpo", messages=good, max_tokens=2).choices  # still serving


def chunked_post(url: str, path: str, total: int, chunk: int = 1 << 16) -> tuple[int, bytes, int]:
    """POST `total` bytes with chunked transfer encoding (no Content-Length), never sending the final
    chunk, so only a server that refuses before the end answers at all. Stops sending once an answer
    arrives. Returns the status, the raw answer and the bytes sent."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT_S)
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode())
    sent, piece = 0, f"{chunk:x}\r\n".encode() + b"x" * chunk + b"\r\n"
    try:
        while sent < total and not select.select([sock], [], [], 0)[0]:
            sock.sendall(piece)
            sent += chunk
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while the body was still coming: read its answer
    answer = b""
    try:
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        sock.settimeout(2)
        while data := sock.recv(65536):
            answer += data
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        sock.close()
    return int(answer.split(b" ", 2)[1]), answer, sent


def test_a_20mb_chunked_body_is_refused_before_its_end(served: dict, client, items) -> None:
    status, answer, sent = chunked_post(served["url"], "/v1/chat/completions", 20_000_000)
    assert status == 413 and b"max_body_bytes" in answer, answer[:300]
    print(f"\n20 MB chunked body: 413 after {sent / 1e6:.1f} MB sent, no final chunk")
    assert client.chat.completions.create(model="cadpo", messages=messages(items[0]), max_tokens=1).choices


def test_a_cross_origin_preflight_gets_no_allow_origin(served: dict) -> None:
    """CORS is off: Ray's ingress would answer any origin, with credentials."""
    headers = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    for path in ("/v1/chat/completions", "/v1/models", "/demo/gradio_api/queue/join"):
        r = requests.options(served["url"] + path, headers=headers, timeout=TIMEOUT_S)
        assert "access-control-allow-origin" not in r.headers, (path, dict(r.headers))
    r = requests.get(served["url"] + "/v1/models", headers={**AUTH, "Origin": "http://evil.example"},
                     timeout=TIMEOUT_S)  # fmt: skip
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def hold(url: str, path: str) -> socket.socket:
    """A model request that stays in the ingress: its headers sent, its body never finished."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT_S)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{").encode())  # fmt: skip
    return sock


def test_a_full_ingress_answers_503_with_retry_after_then_recovers(served: dict, client, items) -> None:
    """`max_ongoing_requests + max_queued_requests` model requests held (slow uploads hold a place like
    long generations do); the next one is answered 503 with Retry-After at once, and the server serves
    again when they go."""
    limit = ONGOING + QUEUED
    held = [hold(served["url"], "/v1/chat/completions") for _ in range(limit)]
    try:
        deadline = time.monotonic() + 60
        while True:  # a request the rules refuse at once if admitted (422), so probes cost nothing
            r = post(served, "/v1/chat/completions", json={"messages": [], "n": 10**6})
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            assert r.status_code == 422, r.text
            time.sleep(0.2)
        assert r.status_code == 503 and r.headers["retry-after"].isdigit(), (r.status_code, r.headers)
        assert r.json()["error"]["code"] == 503 and f"limit {limit}" in r.json()["error"]["message"]
        assert requests.get(served["url"] + "/healthz", timeout=TIMEOUT_S).status_code == 200  # not counted
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 60
    while True:
        try:
            reply = client.chat.completions.create(model="cadpo", messages=messages(items[0]), max_tokens=1)
            break
        except Exception:  # 503 while the held requests are let go
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert reply.choices


def test_answer_route_and_the_comparison_page(served: dict, items) -> None:
    image = base64.b64encode(items[3].image).decode()
    r = post(served, "/v1/answer", json={"image": image, "question": items[3].text, "mode": "confidence",
                                         "model": "idk_it"})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "idk_it" and len(body["samples"]) == 4 and 0 <= body["confidence"] <= 1
    bad = post(served, "/v1/answer", json={"image": image, "question": "q", "model": "nope"})
    assert bad.status_code == 404 and "not served" in bad.json()["error"]["message"]
    page = requests.get(served["url"] + "/demo/config", headers=AUTH, timeout=TIMEOUT_S)
    assert page.status_code == 200 and "I don't know" in page.text


def test_32_clients_get_no_errors(client, items, record_property) -> None:
    """32 keyed clients x 8 requests (one token each, every model, every third streamed): all answered."""
    clients, per_client = 32, 8
    total = clients * per_client

    def one(i: int) -> tuple[str, float]:
        start = time.perf_counter()
        model = MODELS[i % len(MODELS)]
        stream = i % 3 == 0
        reply = client.chat.completions.create(model=model, messages=messages(items[i % len(items)]),
                                               temperature=0, max_tokens=1, stream=stream)  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream else (
            reply.choices[0].message.content)  # fmt: skip
        return text, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(total)))  # an exception (any non-2xx) fails the test
    wall = time.perf_counter() - start
    assert len(results) == total and all(isinstance(t, str) for t, _ in results)
    summary = {
        "requests": total,
        "clients": clients,
        "wall_s": round(wall, 1),
        "req_per_s": round(total / wall, 1),
    }
    record_property("llm_load", json.dumps(summary))
    print(f"\nllm serve load: {summary}")


def test_the_demo_compares_every_method_in_a_browser(served: dict, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, TIMEOUT_S)
    browser.get(served["url"] + "/demo/")  # no key yet: the login form
    key_field = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[name=key]"))[0]
    key_field.send_keys(KEY)
    key_field.submit()  # the key sets an HttpOnly cookie and redirects to the demo
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"))
    examples = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".gradio-container table tbody tr"))
    assert len(examples) >= 6  # the run's test sets: in-domain, out-of-domain, unanswerable
    examples[-1].click()  # an unanswerable item
    question = browser.find_element(By.CSS_SELECTOR, "#question textarea")
    wait.until(lambda d: question.get_attribute("value"))
    expected = browser.find_element(By.CSS_SELECTOR, "#expected textarea")
    assert "unanswerable" in expected.get_attribute("value")
    browser.find_element(By.CSS_SELECTOR, "#with-confidence input").click()
    browser.find_element(By.CSS_SELECTOR, "#ask").click()
    rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#comparison-table tr[data-model]"))
    assert [r.get_attribute("data-model") for r in rows] == MODELS
    for row in rows:
        assert "error" not in row.text and ("ANSWERED" in row.text or "REFUSED" in row.text), row.text
        assert "%" in row.text  # the confidence column
    latency = browser.find_element(By.CSS_SELECTOR, "#latency textarea").get_attribute("value")
    assert latency.endswith(f"for {len(MODELS)} models")
    shot = tmp_path / "compare_demo.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"\ncomparison demo screenshot: {shot}")


def test_the_endpoint_backend_scores_the_served_model_as_evaluated_in_process(
    served: dict, tiny_config: Config
) -> None:
    """`jobs.evaluate_endpoint` on the served `sft` gives exactly the in-process greedy answers (the
    evaluate stage's generation, transformers) on the run's test items, and both models land side by side
    in the run's metrics and report."""
    import pyarrow as pa

    from inbol_ray.checkpoint import load_model
    from inbol_ray.config import load_config
    from inbol_ray.data import io as dio
    from inbol_ray.eval.evaluate import write_predictions
    from inbol_ray.generation.grade import grade_predictions
    from inbol_ray.model.generation import clean_response, generate_responses
    from inbol_ray.model.prompt import render_prompt
    from inbol_ray.run_layout import RunLayout
    from jobs import evaluate_endpoint

    run = served["run"]
    overrides = [f"run_dir={run}", "model.build_tiny=true", f"eval.max_new_tokens={MAX_TOKENS}"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    items = dio.read_table(str(run / "items")).to_pandas()
    model, processor = load_model(str(run / "models" / "sft"))
    prompts = [
        render_prompt(q, c, cfg.prompt) for q, c in zip(items["question"], items["choices"], strict=True)
    ]
    out = generate_responses(model, processor, list(items["image"]), prompts, max_new_tokens=MAX_TOKENS)
    items["responses"] = [[clean_response(r[0])] for r in out]
    layout = RunLayout.of(cfg)
    graded = grade_predictions(items.drop(columns=["image"]), "sft", cfg.grading.vqa_correct_at)
    dio.write_table(
        pa.Table.from_pandas(graded, preserve_index=False), layout.eval_shards("sft") + "/part.parquet"
    )
    write_predictions(layout, ["sft"])  # the evaluate stage's answers of `sft`, computed in this process
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), *overrides, "--name", "served-sft",
            "--base-url", served["url"] + "/v1", "--model", "sft", "--api-key-env", KEY_ENV]  # fmt: skip
    assert evaluate_endpoint.main(argv) == 0
    predictions = dio.read_table(str(run / "predictions.parquet")).to_pandas()
    local = predictions[predictions["model"] == "sft"].set_index("id")["response"]
    remote = predictions[predictions["model"] == "served-sft"].set_index("id")["response"]
    assert len(local) == 12 and remote.sort_index().to_dict() == local.sort_index().to_dict()
    metrics = dio.read_table(str(run / "metrics.parquet")).to_pandas()
    assert {"sft", "served-sft"} <= set(metrics["method"])
    text = (run / "report.md").read_text()  # the job rewrote the run's report with the endpoint model
    assert f"`served-sft` (endpoint {served['url']}/v1, model `sft`)" in text
    assert "| sft " in text and "| served-sft " in text
