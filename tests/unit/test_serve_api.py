"""The Serve app's HTTP surface without Ray: request checks and every route through FastAPI's TestClient.

A fake model client stands in for the deployment, so each bad input is checked for its status and the
field its message names, in milliseconds; tests/integration/test_serve.py runs the real thing, and
test_serve_parts.py the deployment's pure pieces and the demo's.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from inbol_ray.config import Config
from serve import api
from serve.api import ApiError, Limits, build_http_app, parse_answer_request, parse_chat_request

LIMITS = Limits(max_image_bytes=20_000, max_image_pixels=100 * 100, max_question_chars=200)


def png(width: int = 32, height: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG_B64 = base64.b64encode(png()).decode()


class FakeModel:
    """Records what reached the model; answers like the deployment does."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple] = []
        self.fail = fail

    async def answer(self, image: bytes, question: str, mode: str) -> dict[str, Any]:
        self.calls.append(("answer", image, question, mode))
        if self.fail:
            raise RuntimeError("engine died")
        result: dict[str, Any] = {"answer": "I don't know.", "refused": True}
        if mode == "confidence":
            result.update(confidence=0.5, samples=["I don't know.", "red"])
        return result

    async def complete(self, image, question, temperature, top_p, max_new_tokens) -> dict[str, Any]:
        self.calls.append(("complete", question, temperature, top_p, max_new_tokens))
        return {"answer": "red", "refused": False}

    async def info(self) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("not loaded")
        return {"engine": "fake"}


@pytest.fixture()
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture()
def client(model: FakeModel) -> TestClient:
    return TestClient(build_http_app(model, LIMITS, "tiny"))


def chat_body(*parts: dict, **extra: Any) -> dict[str, Any]:
    return {"model": "x", "messages": [{"role": "user", "content": list(parts)}], **extra}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# --- routes ------------------------------------------------------------------------------------------


def test_answer_route_returns_the_documented_shape(client: TestClient, model: FakeModel) -> None:
    r = client.post("/v1/answer", json={"image": PNG_B64, "question": " What colour? "})
    assert r.status_code == 200
    body = r.json()
    assert body["answer"] == "I don't know." and body["refused"] is True
    assert "confidence" not in body and body["latency_ms"] >= 0
    assert model.calls == [("answer", png(), "What colour?", "answer")]

    r = client.post("/v1/answer", json={"image": PNG_B64, "question": "q", "mode": "confidence"})
    assert r.status_code == 200 and r.json()["confidence"] == 0.5


def test_chat_completions_route_is_openai_shaped(client: TestClient, model: FakeModel) -> None:
    body = chat_body(text("What colour?"), image_url("data:image/png;base64," + PNG_B64), max_tokens=4)
    body["messages"].insert(0, {"role": "system", "content": "You are helpful."})
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "tiny"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "red"}
    assert out["choices"][0]["finish_reason"] == "stop" and out["refused"] is False
    assert model.calls == [("complete", "What colour?", 0.0, 1.0, 4)]


def test_health_readiness_models_and_root(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "engine": "fake"}
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/demo/"


def test_readyz_is_503_and_model_errors_are_json_500() -> None:
    c = TestClient(build_http_app(FakeModel(fail=True), LIMITS, "tiny"), raise_server_exceptions=False)
    r = c.get("/readyz")
    assert r.status_code == 503 and "not loaded" in r.json()["error"]
    r = c.post("/v1/answer", json={"image": PNG_B64, "question": "q"})
    assert r.status_code == 500 and "RuntimeError" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("raw", "status", "needle"),
    [
        (b"", 400, "empty"),
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object, got array"),
        (b'"text"', 400, "JSON object, got string"),
    ],
)
def test_unreadable_bodies_are_400(client: TestClient, raw: bytes, status: int, needle: str) -> None:
    r = client.post("/v1/answer", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status and needle in r.json()["error"]["message"]


def test_oversized_body_is_refused_from_its_declared_length(client: TestClient, model: FakeModel) -> None:
    r = client.post("/v1/answer", content=b"x" * (LIMITS.max_body_bytes + 1))
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]
    assert model.calls == []


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    assert client.get("/v2/nothing").json()["error"]["code"] == 404
    assert client.get("/v1/answer").status_code == 405


# --- /v1/answer parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param", "needle"),
    [
        ({"question": "q"}, 422, "image", "missing field 'image'"),
        ({"image": PNG_B64}, 422, "question", "missing field 'question'"),
        ({"image": PNG_B64, "question": "   "}, 422, "question", "empty"),
        ({"image": PNG_B64, "question": 7}, 422, "question", "must be a string, got int"),
        ({"image": [1], "question": "q"}, 422, "image", "must be a string, got array"),
        ({"image": None, "question": "q"}, 422, "image", "got null"),
        ({"image": PNG_B64, "question": "q", "mode": "guess"}, 422, "mode", "answer, confidence"),
        ({"image": PNG_B64, "question": "q", "mdoe": "answer"}, 422, "mdoe", "unknown field"),
        ({"image": "%%%not base64%%%", "question": "q"}, 422, "image", "not valid base64"),
        (
            {"image": base64.b64encode(b"hello, not an image").decode(), "question": "q"},
            422,
            "image",
            "decodable",
        ),
        ({"image": base64.b64encode(png()[:60]).decode(), "question": "q"}, 422, "image", "decodable"),
        ({"image": "", "question": "q"}, 422, "image", "empty"),
        ({"image": "data:image/png,abc", "question": "q"}, 422, "image", "base64-encoded"),
        (
            {"image": base64.b64encode(b"\0" * 30_000).decode(), "question": "q"},
            413,
            "image",
            "max_image_bytes",
        ),
        ({"image": base64.b64encode(png(200, 200)).decode(), "question": "q"}, 413, "image", "pixels"),
        ({"image": PNG_B64, "question": "x" * 201}, 413, "question", "too long"),
    ],
)
def test_bad_answer_requests(
    client: TestClient, model: FakeModel, body: dict, status: int, param: str, needle: str
) -> None:
    r = client.post("/v1/answer", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"] and err["code"] == status
    assert model.calls == []  # bad input never reaches the model


def test_answer_request_accepts_data_urls_and_wrapped_base64() -> None:
    wrapped = "\n".join(PNG_B64[i : i + 60] for i in range(0, len(PNG_B64), 60))
    for image in ("data:image/png;base64," + PNG_B64, wrapped):
        req = parse_answer_request({"image": image, "question": "q"}, LIMITS)
        assert req.image == png() and req.mode == "answer"


# --- /v1/chat/completions parsing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (chat_body(text("q"), image_url("data:image/png;base64," + PNG_B64), stream=True), "stream"),
        (chat_body(text("q"), image_url("data:image/png;base64," + PNG_B64), n=3), "n=1"),
        ({"messages": []}, "non-empty"),
        ({"messages": "hi"}, "non-empty"),
        (chat_body(text("q")), "exactly one image_url"),
        (chat_body(text("q"), image_url("data:image/png;base64," + PNG_B64), image_url("data:,x")), "got 2"),
        (chat_body(text("q"), image_url("http://example.com/cat.png")), "data: URL"),
        (chat_body(text("   "), image_url("data:image/png;base64," + PNG_B64)), "empty"),
        (chat_body({"type": "audio"}, image_url("data:image/png;base64," + PNG_B64)), "text or image_url"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        (chat_body(text("q"), image_url("data:image/png;base64," + PNG_B64), temperature=9), "temperature"),
        (chat_body(text("q"), image_url("data:image/png;base64," + PNG_B64), max_tokens=0), "max_tokens"),
        (chat_body(text("q"), image_url("data:image/png;base64,aGVsbG8=")), "decodable"),
    ],
)
def test_bad_chat_requests(client: TestClient, model: FakeModel, body: dict, needle: str) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]["message"]
    assert model.calls == []


def test_chat_uses_the_last_user_message_and_decoding_settings() -> None:
    body = chat_body(image_url("data:image/png;base64," + PNG_B64), temperature=0.7, top_p=0.9)
    body["messages"] += [
        {"role": "assistant", "content": "Ask me."},
        {"role": "user", "content": "What shape?"},
    ]
    req = parse_chat_request(body, LIMITS)
    assert (req.question, req.temperature, req.top_p, req.max_tokens) == ("What shape?", 0.7, 0.9, None)


def test_api_error_body_is_openai_shaped() -> None:
    assert ApiError(422, "bad", "image").body() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "image", "code": 422}
    }
    assert ApiError(503, "busy").body()["error"]["type"] == "server_error"


def test_limits_come_from_the_config() -> None:
    cfg = Config()
    limits = Limits.from_config(cfg)
    assert limits.max_image_bytes == cfg.serve.max_image_bytes
    assert limits.max_image_pixels == cfg.data.max_image_pixels
    assert limits.max_question_chars == api.CHARS_PER_TOKEN * cfg.sampling.max_model_len
    assert limits.max_body_bytes > 4 * cfg.serve.max_image_bytes // 3
