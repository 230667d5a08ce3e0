"""The HTTP surface of the Serve app: request parsing with clear 4xx errors, and the FastAPI routes.

Why apart from `serve/app.py`: nothing here imports Ray, so unit tests drive every route and every bad
input through FastAPI's TestClient against the plain model class (or a fake) in milliseconds, and the
Serve ingress only plugs a `DeploymentHandle` in as the `ModelClient`.

Routes (all JSON):
- `POST /v1/answer` `{image: base64 | data URL, question, mode?: "answer"|"confidence"}` ->
  `{answer, refused, latency_ms}` plus `confidence` and `samples` in confidence mode;
- `POST /v1/chat/completions`: an OpenAI-compatible subset (one image as an `image_url` data URL, the
  last user message's text is the question, no streaming, n=1) -> a `chat.completion` object with an
  extra top-level `refused`;
- `GET /v1/models`, `GET /healthz` (liveness: the ingress answers), `GET /readyz` (the model answers).
Errors: `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape, so its clients show the
message): 400 unreadable body, 413 too large, 422 a field that is missing, mistyped or unusable, 503 the
model is not ready or overloaded. A bad request never reaches the model, so it cannot take a replica down.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inbol_ray.config import Config
from inbol_ray.data.images import validate_image

log = logging.getLogger(__name__)

MODES = ("answer", "confidence")
ANSWER_FIELDS = ("image", "question", "mode")
CHARS_PER_TOKEN = 4
"""Question length cap = this x `sampling.max_model_len`: English averages ~4 characters per token, so a
longer question cannot fit the model's context and is refused before it costs a tokenizer call."""
BODY_SLACK_BYTES = 64 << 10
"""JSON framing on top of the base64 image and the question (chat messages, field names)."""
READY_TIMEOUT_S = 10.0
"""`/readyz` fails when the model does not answer `info` within this (a stuck or starting replica)."""
DEMO_PATH = "/demo"


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and the field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)


def error_body(
    status: int, message: str, param: str | None = None, kind: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape (its clients show `message`); `kind` defaults by status class."""
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


@dataclass(frozen=True)
class Limits:
    """What one request may carry; all derived from the run config so one YAML sets them."""

    max_image_bytes: int
    max_image_pixels: int
    max_question_chars: int

    @classmethod
    def from_config(cls, cfg: Config) -> Limits:
        return cls(
            max_image_bytes=cfg.serve.max_image_bytes,
            max_image_pixels=cfg.data.max_image_pixels,
            max_question_chars=CHARS_PER_TOKEN * cfg.sampling.max_model_len,
        )

    @property
    def max_body_bytes(self) -> int:
        """Largest acceptable request body: a maximal image in base64, a maximal UTF-8 question, framing."""
        return 4 * (self.max_image_bytes // 3 + 1) + 4 * self.max_question_chars + BODY_SLACK_BYTES


@dataclass(frozen=True)
class AnswerRequest:
    image: bytes
    question: str
    mode: str


@dataclass(frozen=True)
class ChatRequest:
    image: bytes
    question: str
    temperature: float
    top_p: float
    max_tokens: int | None


class ModelClient(Protocol):
    """What the routes need from the model: the plain `RefusalAwareModel` or a handle-backed client."""

    async def answer(self, image: bytes, question: str, mode: str) -> dict[str, Any]: ...

    async def complete(
        self, image: bytes, question: str, temperature: float, top_p: float, max_new_tokens: int | None
    ) -> dict[str, Any]: ...

    async def info(self) -> dict[str, Any]: ...


# --- parsing -----------------------------------------------------------------------------------------


def parse_json(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise ApiError(400, "request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_type(body)}")
    return body


def _type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def require_str(body: dict[str, Any], key: str) -> str:
    if key not in body:
        raise ApiError(422, f"missing field '{key}'", key)
    value = body[key]
    if not isinstance(value, str):
        raise ApiError(422, f"field '{key}' must be a string, got {_type(value)}", key)
    return value


def check_question(text: str, limits: Limits, param: str = "question") -> str:
    text = text.strip()
    if not text:
        raise ApiError(422, f"field '{param}' is empty; ask a question about the image", param)
    if len(text) > limits.max_question_chars:
        raise ApiError(413, f"question too long: {len(text)} characters > {limits.max_question_chars}", param)
    return text


_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.IGNORECASE)


def check_image(data: bytes, limits: Limits, param: str = "image") -> bytes:
    """The bytes if they are a decodable image within the limits; else 413 (too large) or 422."""
    ok, reason = validate_image(data, limits.max_image_bytes, limits.max_image_pixels)
    if not ok:
        # validate_image phrases every size failure as "image too large: ..." (its documented reasons).
        raise ApiError(413 if reason.startswith("image too large") else 422, f"{param}: {reason}", param)
    return data


def decode_image_field(value: str, limits: Limits, param: str = "image") -> bytes:
    """Base64 (optionally a `data:image/...;base64,` URL) -> validated image bytes.

    The size is checked on the encoded length first, so an oversized upload is refused without decoding.
    """
    match = _DATA_URL.match(value)
    payload = value[match.end() :] if match else value
    if value.startswith("data:") and not match:
        raise ApiError(422, f"{param}: data URL must be base64-encoded (data:image/png;base64,...)", param)
    payload = "".join(payload.split())  # clients wrap long base64 lines
    if not payload:
        raise ApiError(422, f"field '{param}' is empty; send a base64-encoded image", param)
    estimated = len(payload) * 3 // 4 - payload[-2:].count("=")
    if estimated > limits.max_image_bytes:
        raise ApiError(
            413,
            f"{param}: image too large: {estimated} bytes > max_image_bytes {limits.max_image_bytes}",
            param,
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{param}: not valid base64", param) from None
    return check_image(data, limits, param)


def parse_answer_request(body: dict[str, Any], limits: Limits) -> AnswerRequest:
    unknown = sorted(set(body) - set(ANSWER_FIELDS))
    if unknown:
        raise ApiError(
            422,
            f"unknown field(s) {', '.join(map(repr, unknown))}; expected {', '.join(ANSWER_FIELDS)}",
            unknown[0],
        )
    question = check_question(require_str(body, "question"), limits)
    mode = body.get("mode", "answer")
    if mode not in MODES:
        raise ApiError(422, f"field 'mode' must be one of {', '.join(MODES)}, got {mode!r}", "mode")
    image = decode_image_field(require_str(body, "image"), limits)
    return AnswerRequest(image=image, question=question, mode=mode)


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(422, f"field '{key}' must be a number in [{low}, {high}], got {value!r}", key)
    return float(value)


def _message_parts(message: Any, index: int) -> tuple[str, list[str], str]:
    """(role, image URLs, text) of one chat message."""
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ApiError(422, f"{param} must be an object, got {_type(message)}", param)
    role = message.get("role")
    if role not in ("system", "user", "assistant", "developer"):
        raise ApiError(422, f"{param}.role must be system, user or assistant, got {role!r}", param)
    content = message.get("content")
    if isinstance(content, str):
        return role, [], content
    if not isinstance(content, list):
        raise ApiError(422, f"{param}.content must be a string or an array of parts", param)
    urls, texts = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ApiError(422, f"{param}.content[{j}].image_url.url must be a string", param)
            urls.append(url)
        else:
            raise ApiError(422, f"{param}.content[{j}] must be a text or image_url part", param)
    return role, urls, " ".join(texts)


def parse_chat_request(body: dict[str, Any], limits: Limits) -> ChatRequest:
    if body.get("stream"):
        raise ApiError(422, "stream=true is not supported; the answer is a word or phrase", "stream")
    if body.get("n", 1) != 1:
        raise ApiError(422, "only n=1 is supported (use /v1/answer with mode=confidence for samples)", "n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(422, "field 'messages' must be a non-empty array", "messages")
    parsed = [_message_parts(m, i) for i, m in enumerate(messages)]
    urls = [u for _, us, _ in parsed for u in us]
    if len(urls) != 1:
        raise ApiError(
            422, f"send exactly one image_url (this model sees one image), got {len(urls)}", "messages"
        )
    if not urls[0].startswith("data:"):
        raise ApiError(422, "image_url must be a data: URL; the server fetches nothing", "messages")
    user_texts = [text for role, _, text in parsed if role == "user"]
    if not user_texts:
        raise ApiError(422, "no user message: the last user message's text is the question", "messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise ApiError(
            422, f"field 'max_tokens' must be a positive integer, got {max_tokens!r}", "max_tokens"
        )
    return ChatRequest(
        image=decode_image_field(urls[0], limits, "messages"),
        question=check_question(user_texts[-1], limits, "messages"),
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
        max_tokens=max_tokens,
    )


def chat_completion(result: dict[str, Any], model_name: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result["answer"]},
                "finish_reason": "stop",
            }
        ],
        "refused": result["refused"],
    }


# --- routes ------------------------------------------------------------------------------------------


async def read_body(request: Request, limits: Limits) -> dict[str, Any]:
    """The JSON object of a request, refusing an oversized body before reading it when its length is declared."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise ApiError(413, f"request body too large: {declared} bytes > {limits.max_body_bytes}")
    raw = await request.body()
    if len(raw) > limits.max_body_bytes:
        raise ApiError(413, f"request body too large: {len(raw)} bytes > {limits.max_body_bytes}")
    return parse_json(raw)


async def guarded(call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Await a model call; a failure inside the model becomes a JSON 500 naming its type, not a traceback."""
    try:
        return await call
    except ApiError:
        raise
    except Exception as exc:
        log.exception("model call failed")
        raise ApiError(500, f"model error ({type(exc).__name__}); the server keeps serving") from None


def build_http_app(client: ModelClient, limits: Limits, model_name: str) -> FastAPI:
    """The FastAPI app of the API; the Serve ingress mounts the Gradio demo on it at `DEMO_PATH`."""
    app = FastAPI(title="inbol-ray: refusal-aware VQA", docs_url="/docs", redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.post("/v1/answer")
    async def answer(request: Request) -> dict[str, Any]:
        start = time.perf_counter()
        req = parse_answer_request(await read_body(request, limits), limits)
        result = await guarded(client.answer(req.image, req.question, req.mode))
        return {**result, "latency_ms": round((time.perf_counter() - start) * 1000, 2)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        req = parse_chat_request(await read_body(request, limits), limits)
        result = await guarded(
            client.complete(req.image, req.question, req.temperature, req.top_p, req.max_tokens)
        )
        return chat_completion(result, model_name)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "inbol-ray"}]}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            info = await asyncio.wait_for(client.info(), READY_TIMEOUT_S)
        except Exception as exc:  # not ready, for whatever reason: say why, with the right status
            return JSONResponse(
                {"status": "not ready", "error": f"{type(exc).__name__}: {exc}"}, status_code=503
            )
        return JSONResponse({"status": "ready", **info})

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(DEMO_PATH + "/")

    return app
