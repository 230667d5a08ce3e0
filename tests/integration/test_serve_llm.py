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
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
    try:
        overrides = [
            "sampling.cpus_per_actor=0.5",  # two deployments beside the session's other actors on 2 CPUs
            f"eval.max_new_tokens={MAX_TOKENS}",
            "serve.confidence_k=4",
        ]
        app = build_llm_app({"config": str(ROOT / "configs" / "tiny.yaml"), "overrides": overrides,
                             "run_dir": bucket_run, "models": MODELS})  # fmt: skip
        start = time.perf_counter()
        serve.run(app, name="inbol-llm", route_prefix="/")
        print(f"\nllm app up in {time.perf_counter() - start:.0f} s")
        yield {"url": f"http://127.0.0.1:{port}", "run": run, "bucket_run": bucket_run}
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(served: dict):
    from openai import OpenAI

    return OpenAI(base_url=served["url"] + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


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
    routes = {m.id: m.model_extra["metadata"]["route"] for m in listed}
    assert routes == {"base": "base", "sft": "sft", "idk_it": "base:idk_it", "cadpo": "base:cadpo"}
    where = {m.id: m.model_extra["metadata"]["checkpoint"] for m in listed}  # served from the bucket
    assert where["cadpo"] == f"{served['bucket_run']}/models/cadpo/adapter", where
    assert all(w.startswith(f"{served['bucket_run']}/models/{m}") for m, w in where.items()), where
    ready = requests.get(served["url"] + "/readyz", timeout=TIMEOUT_S)
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


def test_hostile_requests_get_4xx_in_openais_error_shape(served: dict, client, items) -> None:
    import openai

    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-4", messages=messages(items[0]))
    url = served["url"] + "/v1/chat/completions"
    good = messages(items[0])
    two_images = [{"role": "user", "content": [*good[0]["content"], good[0]["content"][0]]}]
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}},
                                           {"type": "text", "text": "what?"}]}]  # fmt: skip
    not_image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                  + base64.b64encode(b"not a png").decode()}}, {"type": "text", "text": "what?"}]}]  # fmt: skip
    bad = [
        ({"model": "cadpo", "messages": two_images}, 422),
        ({"model": "cadpo", "messages": remote}, 422),
        ({"model": "cadpo", "messages": not_image}, 422),
        ({"model": "cadpo", "messages": [{"role": "assistant", "content": "hi"}]}, 422),
        ({"model": "cadpo", "messages": good, "n": 1, "confidence": True}, 422),
        ({"model": "cadpo", "messages": good, "n": 2, "confidence": True, "stream": True}, 422),
        ({"model": "cadpo"}, 400),
        ({"model": "cadpo", "messages": good, "max_tokens": -3}, 400),
        ({"model": "cadpo", "messages": "hello"}, 400),
    ]
    for body, status in bad:
        r = requests.post(url, json=body, timeout=TIMEOUT_S)
        assert r.status_code == status, (body.get("messages") and "messages", r.text)
        error = r.json()["error"]
        assert error["message"] and "type" in error and "code" in error, r.text
    for path in ("/v1/models/nope", "/no/such/route"):
        r = requests.get(served["url"] + path, timeout=TIMEOUT_S)
        assert r.status_code == 404 and r.json()["error"]["message"]
    r = requests.post(url, data=b"{not json", headers={"content-type": "application/json"}, timeout=TIMEOUT_S)
    assert 400 <= r.status_code < 500 and r.json()["error"]["message"]
    assert client.chat.completions.create(model="cadpo", messages=good, max_tokens=2).choices  # still serving


def test_answer_route_and_the_comparison_page(served: dict, items) -> None:
    image = base64.b64encode(items[3].image).decode()
    r = requests.post(served["url"] + "/v1/answer", timeout=TIMEOUT_S,
                      json={"image": image, "question": items[3].text, "mode": "confidence", "model": "idk_it"})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "idk_it" and len(body["samples"]) == 4 and 0 <= body["confidence"] <= 1
    bad = requests.post(served["url"] + "/v1/answer", json={"image": image, "question": "q", "model": "nope"},
                        timeout=TIMEOUT_S)  # fmt: skip
    assert bad.status_code == 404 and "not served" in bad.json()["error"]["message"]
    page = requests.get(served["url"] + "/demo/config", timeout=TIMEOUT_S)
    assert page.status_code == 200 and "I don't know" in page.text


def test_32_clients_get_no_errors(client, items, record_property) -> None:
    def one(i: int) -> tuple[str, float]:
        start = time.perf_counter()
        model = MODELS[i % len(MODELS)]
        stream = i % 3 == 0
        reply = client.chat.completions.create(model=model, messages=messages(items[i % len(items)]),
                                               temperature=0, max_tokens=MAX_TOKENS, stream=stream)  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream else (
            reply.choices[0].message.content)  # fmt: skip
        return text, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(128)))  # an exception (any non-2xx) fails the test
    wall = time.perf_counter() - start
    assert len(results) == 128 and all(isinstance(t, str) for t, _ in results)
    summary = {"requests": 128, "clients": 32, "wall_s": round(wall, 1), "req_per_s": round(128 / wall, 1)}
    record_property("llm_load", json.dumps(summary))
    print(f"\nllm serve load: {summary}")


def test_the_demo_compares_every_method_in_a_browser(served: dict, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, TIMEOUT_S)
    browser.get(served["url"] + "/demo/")
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
            "--base-url", served["url"] + "/v1", "--model", "sft"]  # fmt: skip
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
