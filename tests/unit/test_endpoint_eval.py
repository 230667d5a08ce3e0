"""Evaluating a model behind an OpenAI-compatible endpoint that fails: a test server on loopback answers
deterministically, but errs (500, 429 with Retry-After, a reply slower than the client's timeout) on a share
of requests, and is down for half the items during the first run (the "interruption"). The evaluation must
end complete, with nothing lost, and no item that had an answer asked again on the resumed run."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pytest

from inbol_ray import schema as S
from inbol_ray.config import load_config
from inbol_ray.data import io as dio
from inbol_ray.data.shapes import generate_items
from inbol_ray.eval.endpoint import EndpointSpec, UnsafeKey, auth_headers, chat_body, evaluate_endpoint
from inbol_ray.generation.shards import Selection
from inbol_ray.model.prompt import render_prompt
from inbol_ray.run_layout import RunLayout

ROOT = Path(__file__).resolve().parents[2]


def answer_for(text: str) -> str:
    """The server's deterministic 'model': refuses questions whose hash is odd, answers 'red' otherwise."""
    return "I don't know." if int(hashlib.sha1(text.encode()).hexdigest(), 16) % 2 else "red"


def item_key(body: dict) -> str:
    """What the server knows an item by: its prompt text and a digest of the whole message (image included),
    since two items can ask the same question of different pictures ("Is there a circle?")."""
    text = body["messages"][0]["content"][-1]["text"]
    return f"{text}#{hashlib.sha1(json.dumps(body['messages'], sort_keys=True).encode()).hexdigest()[:12]}"


class FlakyServer:
    """`faults=False`: a plain server, for counting what a run asks. A model other than `m` answers with its
    own name, so graded answers show which model gave them."""

    def __init__(self, faults: bool = True) -> None:
        self.faults = faults
        self.down: set[str] = set()  # item keys answered with 503 whatever the attempt
        self.attempts: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.bodies: list[dict] = []
        self.headers: list[dict[str, str]] = []  # each request's headers, lower-cased names
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                text = item_key(body)
                server.bodies.append(body)
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                server.attempts[text] += 1
                n = server.attempts[text]
                kind = int(hashlib.md5(text.encode()).hexdigest(), 16) % 5
                if text in server.down:
                    return self._send(503, {"error": {"message": "down"}})
                first = n == 1 and server.faults
                if first and kind == 0:
                    return self._send(500, {"error": {"message": "boom"}})
                if first and kind == 1:
                    return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                content = answer_for(text) if body["model"] == "m" else body["model"]
                reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
                if first and kind == 2:
                    time.sleep(1.0)  # past the client's timeout: this answer is never read (not counted)
                    with contextlib.suppress(OSError):
                        self._send(200, reply)
                    return None
                server.answered[text] += 1
                return self._send(200, reply)

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in {"content-type": "application/json", **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = FlakyServer()
    yield s
    s.close()


def test_a_failing_endpoint_still_gives_a_complete_evaluation_and_resumes_without_reasking(
    tmp_path: Path, server: FlakyServer
) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={tmp_path}"])
    shapes = dataclasses.replace(cfg.data.shapes, n_pretrain=0, n_train=0, n_val=0, n_id_test=12, n_ood_test=4,
                                 n_unanswerable_test=8)  # fmt: skip
    items = generate_items(shapes, cfg.model.image_size)
    dio.write_table(items, str(tmp_path / "items" / "part-0.parquet"))
    layout = RunLayout.of(cfg)
    selection = Selection(splits=("id_test", "ood_test", "unanswerable_test"))
    texts = {r[S.ID]: item_key(chat_body(r, cfg, "m")) for r in items.to_pylist()}
    assert len(set(texts.values())) == len(texts)
    ids = sorted(texts)
    server.down = {texts[i] for i in ids[::2]}  # half the items cannot be answered in the first run
    spec = EndpointSpec(
        "flaky", server.url, "m", concurrency=4, timeout_s=0.5, max_attempts=3, backoff_s=0.01
    )

    graded, run = evaluate_endpoint(cfg, layout, spec, selection.mask, log=lambda _: None)
    assert run.asked == len(ids) and run.reused == 0
    assert set(run.failed) == set(ids[::2]) and all("503" in why for why in run.failed.values())
    assert sorted(graded[S.ID]) == ids[1::2]
    quarantined = dio.read_table(layout.quarantine("evaluate_flaky")).to_pylist()
    assert sorted(q[S.ROW_KEY] for q in quarantined) == ids[::2]  # nothing lost: listed with the reason
    first = Counter(server.answered)

    server.down = set()
    graded, run = evaluate_endpoint(cfg, layout, spec, selection.mask, log=lambda _: None)
    assert run.asked == len(ids) // 2 and run.reused == len(ids) // 2 and not run.failed
    assert sorted(graded[S.ID]) == ids  # complete
    for i in ids[1::2]:  # answered in the first run: not asked again
        assert server.answered[texts[i]] == first[texts[i]] == 1
    assert all(server.answered[texts[i]] == 1 for i in ids)  # retries never double-count an answer
    assert any(server.attempts[t] > 1 for t in texts.values())  # the faults did happen and were retried
    by_id = graded.set_index(S.ID)
    for i in ids:
        assert by_id.loc[i, S.RESPONSE] == answer_for(texts[i])
        assert bool(by_id.loc[i, S.REFUSED]) == (answer_for(texts[i]) == "I don't know.")
    assert dio.read_table(layout.quarantine("evaluate_flaky")).num_rows == 0
    metrics = dio.read_table(layout.metrics).to_pandas()
    assert set(metrics[S.METHOD if S.METHOD in metrics else S.MODEL]) == {"flaky"}
    body = server.bodies[0]
    assert body["temperature"] == 0 and body["render"] is False
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_a_text_only_item_is_sent_without_an_image(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    row = {
        S.ID: "t:1",
        S.QUESTION: "What is the capital of France?",
        S.CHOICES: None,
        S.IMAGE: None,
        S.IMAGE_PATH: None,
    }
    body = chat_body(row, cfg, "m")
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": render_prompt(row[S.QUESTION], None, cfg.prompt)}
    ]


def test_the_configs_system_line_opens_the_conversation() -> None:
    """Methods are sampled, trained and evaluated after `prompt.system` (the LLaVA configs' vicuna_v1
    line); an endpoint scored beside them gets the same line as a system message."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["prompt.system=A chat between a curious human."])
    row = {S.ID: "t:1", S.QUESTION: "Capital of France?", S.CHOICES: None, S.IMAGE: None, S.IMAGE_PATH: None}
    messages = chat_body(row, cfg, "m")["messages"]
    assert messages[0] == {"role": "system", "content": "A chat between a curious human."}
    assert [m["role"] for m in messages] == ["system", "user"]


# --- the journal is keyed by what produced the answers -------------------------------------------------


@pytest.fixture()
def quiet_server():
    s = FlakyServer(faults=False)
    yield s
    s.close()


def small_run(tmp_path: Path, *overrides: str):
    """A run directory holding only evaluation items (a dozen ShapesWorld questions): (config, item ids)."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={tmp_path}", *overrides])
    shapes = dataclasses.replace(cfg.data.shapes, n_pretrain=0, n_train=0, n_val=0, n_id_test=6, n_ood_test=2,
                                 n_unanswerable_test=4)  # fmt: skip
    items = generate_items(shapes, cfg.model.image_size)
    dio.write_table(items, str(tmp_path / "items" / "part-0.parquet"))
    return cfg, sorted(items[S.ID].to_pylist())


def evaluate(cfg, server: FlakyServer, model: str, url: str = ""):
    """One evaluation under the name `x`: (graded answers by id, run, requests the server got meanwhile)."""
    before = len(server.bodies)
    spec = EndpointSpec("x", url or server.url, model, concurrency=4, backoff_s=0.01)
    selection = Selection(splits=("id_test", "ood_test", "unanswerable_test"))
    graded, run = evaluate_endpoint(cfg, RunLayout.of(cfg), spec, selection.mask, log=lambda _: None)
    return dict(zip(graded[S.ID], graded[S.RESPONSE], strict=True)), run, len(server.bodies) - before


def test_the_same_name_against_another_model_endpoint_prompt_or_decoding_asks_every_item_again(
    tmp_path: Path, quiet_server: FlakyServer
) -> None:
    cfg, ids = small_run(tmp_path)
    answers, run, asked = evaluate(cfg, quiet_server, "a")
    assert asked == run.asked == len(ids) and answers == dict.fromkeys(ids, "a")

    answers, run, asked = evaluate(cfg, quiet_server, "b")  # another model under the same name
    assert asked == run.asked == len(ids) and run.reused == 0
    assert answers == dict.fromkeys(ids, "b")  # b's answers, none of a's passed off as b's

    answers, run, asked = evaluate(cfg, quiet_server, "a")  # back to a, unchanged: a's journal
    assert asked == run.asked == 0 and run.reused == len(ids) and answers == dict.fromkeys(ids, "a")
    answers, run, asked = evaluate(cfg, quiet_server, "a", quiet_server.url + "/")  # the same endpoint
    assert asked == 0

    port = quiet_server.httpd.server_address[1]
    _, run, asked = evaluate(cfg, quiet_server, "a", f"http://localhost:{port}/v1")  # another base URL
    assert asked == run.asked == len(ids)
    decoding, _ = small_run(tmp_path, f"eval.max_new_tokens={cfg.eval.max_new_tokens + 4}")
    _, run, asked = evaluate(decoding, quiet_server, "a")
    assert asked == run.asked == len(ids)
    assert {b["max_tokens"] for b in quiet_server.bodies[-asked:]} == {cfg.eval.max_new_tokens + 4}
    prompt, _ = small_run(tmp_path, "prompt.short_answer=Answer in one word.")
    _, run, asked = evaluate(prompt, quiet_server, "a")
    assert asked == run.asked == len(ids)

    journals = sorted(p.name for p in (tmp_path / "eval" / "endpoint" / "x").iterdir())
    assert len(journals) == 5  # a, b, the other URL, the other decoding, the other prompt: side by side
    key = json.loads((tmp_path / "eval" / "endpoint" / "x" / journals[0] / "key.json").read_text())
    assert set(key) == {"backend", "base_url", "request", "prompt"} and "messages" not in key["request"]


def test_an_item_changed_under_the_same_id_is_asked_again(tmp_path: Path, quiet_server: FlakyServer) -> None:
    cfg, ids = small_run(tmp_path)
    evaluate(cfg, quiet_server, "a")
    items = dio.read_table(str(tmp_path / "items")).to_pylist()
    items[0][S.QUESTION] += " Look closely."  # a re-prepared run: same id, another question
    dio.write_table(pa.Table.from_pylist(items, dio.read_table(str(tmp_path / "items")).schema),
                    str(tmp_path / "items" / "part-0.parquet"))  # fmt: skip
    _, run, asked = evaluate(cfg, quiet_server, "a")
    assert asked == run.asked == 1 and run.reused == len(ids) - 1
    assert quiet_server.bodies[-1]["messages"][0]["content"][-1]["text"].count("Look closely.") == 1


def test_answers_journaled_before_journals_were_keyed_are_not_read(
    tmp_path: Path, quiet_server: FlakyServer
) -> None:
    cfg, ids = small_run(tmp_path)
    legacy = tmp_path / "eval" / "endpoint" / "x" / "answers"  # the unkeyed layout: who answered these?
    legacy.mkdir(parents=True)
    for n, i in enumerate(ids):
        (legacy / f"{n}.json").write_text(json.dumps({"id": i, "response": "stale"}))
    lines: list[str] = []
    spec = EndpointSpec("x", quiet_server.url, "a", concurrency=4)
    selection = Selection(splits=("id_test", "ood_test", "unanswerable_test"))
    graded, run = evaluate_endpoint(cfg, RunLayout.of(cfg), spec, selection.mask, log=lines.append)
    assert run.asked == len(ids) and set(graded[S.RESPONSE]) == {"a"}
    assert any("left unread: answers" in line for line in lines)


def test_the_job_keys_its_journal_by_model(tmp_path: Path, quiet_server: FlakyServer) -> None:
    from jobs import evaluate_endpoint as job

    small_run(tmp_path)
    sets = ["shapes_id_test", "shapes_unanswerable"]
    n = sum(d in sets for d in dio.read_table(str(tmp_path / "items"))[S.DATASET].to_pylist())
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(tmp_path), "--name", "x",
            "--base-url", quiet_server.url, "--datasets", ",".join(sets)]  # fmt: skip
    for model, asked in (("a", n), ("b", n), ("b", 0)):
        before = len(quiet_server.bodies)
        assert job.main([*argv, "--model", model]) == 0
        assert len(quiet_server.bodies) - before == asked, model
    predictions = dio.read_table(str(tmp_path / "predictions.parquet")).to_pandas()
    assert set(predictions[S.RESPONSE]) == {"b"}
    assert not (tmp_path / ".lease.json").exists()  # the job held the run and let it go


# --- the key goes only where it was meant to, and never in clear text off the machine ---------------------


def _job_argv(tmp_path: Path, base_url: str, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(tmp_path), "--name", "x",
            "--base-url", base_url, "--model", "a", "--datasets", "shapes_id_test", *extra]  # fmt: skip


def test_no_key_is_sent_unless_its_variable_is_named(
    tmp_path: Path, quiet_server: FlakyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ambient `$OPENAI_API_KEY` (meant for some hosted API) never reaches an endpoint by default; the
    variable named with --api-key-env does, as a Bearer token."""
    from jobs import evaluate_endpoint as job

    monkeypatch.setenv("OPENAI_API_KEY", "sk-ambient")
    monkeypatch.setenv("INBOL_TEST_ENDPOINT_KEY", "k-named")
    small_run(tmp_path / "plain")
    assert job.main(_job_argv(tmp_path / "plain", quiet_server.url)) == 0
    unnamed = list(quiet_server.headers)
    assert unnamed and all("authorization" not in h for h in unnamed)

    small_run(tmp_path / "named")  # a run of its own: the journal would otherwise reuse the answers
    named_argv = _job_argv(tmp_path / "named", quiet_server.url, "--api-key-env", "INBOL_TEST_ENDPOINT_KEY")
    assert job.main(named_argv) == 0
    named = quiet_server.headers[len(unnamed) :]
    assert named and all(h["authorization"] == "Bearer k-named" for h in named)


def test_a_key_over_plain_http_to_another_host_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs import evaluate_endpoint as job

    small_run(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.setenv("INBOL_TEST_ENDPOINT_KEY", "k-secret")
    argv = _job_argv(tmp_path, "http://example.com/v1", "--api-key-env", "INBOL_TEST_ENDPOINT_KEY")
    assert job.main(argv) == 2
    err = capsys.readouterr().err
    assert "http://example.com/v1" in err and "INBOL_TEST_ENDPOINT_KEY" in err and "k-secret" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing asked or written


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/v1",
        "HTTP://EXAMPLE.COM/v1",
        "http://10.0.0.5:8000/v1",  # the cluster's network is not this machine
        "http://127.0.0.1@example.com/v1",  # userinfo, not the host
        "http://localhost.example.com/v1",
        "http://127.0.0.1.nip.io/v1",  # a name that resolves to loopback is still a name
        "ftp://127.0.0.1/v1",
        "127.0.0.1:8000/v1",
    ],
)
def test_a_named_key_is_refused_for_urls_that_would_carry_it_in_clear_text(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INBOL_TEST_ENDPOINT_KEY", "k")
    with pytest.raises(UnsafeKey, match="INBOL_TEST_ENDPOINT_KEY"):
        auth_headers(EndpointSpec("x", url, "m", api_key_env="INBOL_TEST_ENDPOINT_KEY"))
    assert auth_headers(EndpointSpec("x", url, "m")) == {}  # no key named: nothing to protect


@pytest.mark.parametrize(
    "url",
    [
        "https://api.example.com/v1",
        "HTTPS://api.example.com/v1",
        "http://127.0.0.1:8000/v1",
        "http://127.9.9.9/v1",
        "http://[::1]:8000/v1",
        "http://LocalHost:8000/v1",
    ],
)
def test_a_named_key_goes_over_https_or_loopback_http(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INBOL_TEST_ENDPOINT_KEY", "k")
    spec = EndpointSpec("x", url, "m", api_key_env="INBOL_TEST_ENDPOINT_KEY")
    assert auth_headers(spec) == {"Authorization": "Bearer k"}


def test_a_named_key_variable_that_is_not_set_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Named but empty is a typo or a missing secret: every request would be a 401, so stop first."""
    monkeypatch.delenv("INBOL_TEST_ENDPOINT_KEY", raising=False)
    spec = EndpointSpec("x", "https://api.example.com/v1", "m", api_key_env="INBOL_TEST_ENDPOINT_KEY")
    with pytest.raises(UnsafeKey, match=r"\$INBOL_TEST_ENDPOINT_KEY .*not set"):
        auth_headers(spec)
