"""Request parsing with clear 4xx errors, OpenAI's error shape, and the guards in front of every route.

Why apart from the ingress (`serve/llm_ingress.py`): nothing here imports Ray, so unit tests drive every
bad input in milliseconds. What is here: `ApiError` and `error_body` (`{"error": {"message", "type",
"param", "code"}}`, OpenAI's shape, so its clients show the message), `Limits` (from the `serve` section),
`/v1/answer`'s parsing (`parse_answer_request`: 400 unreadable body, 413 too large, 422 a field that is
missing, mistyped or unusable; a bad request never reaches the model), and `read_body`.

The guards the OpenAI ingress puts in front of every route are here too, as plain ASGI middleware (no
Ray, so they test in-process): `BodyLimit` (413, counted as the body streams in) and `Admission` (503 with
Retry-After past the in-flight bound, 504 past the request timeout); `serve/llm_ingress.guard` installs them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inbol_ray.config import Config, ServeConfig
from inbol_ray.data.images import validate_image

log = logging.getLogger(__name__)

MODES = ("answer", "confidence")
ANSWER_FIELDS = ("image", "question", "mode")
CHARS_PER_TOKEN = 4
"""Question length cap = this x `sampling.max_model_len`: English averages ~4 characters per token, so a
longer question cannot fit the model's context and is refused before it costs a tokenizer call."""
READY_TIMEOUT_S = 10.0
"""`/readyz` fails when a deployment does not answer its health check within this (stuck or starting)."""
DEMO_PATH = "/demo"
_SERVE = ServeConfig()


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
    """What one request may carry; all from the run config (`serve`, and `sampling.max_model_len` for a
    question) so one YAML sets them. The defaults are `ServeConfig`'s: a test names only the limits it is
    about."""

    max_image_bytes: int
    max_image_pixels: int
    max_question_chars: int
    max_body_bytes: int = _SERVE.max_body_bytes
    max_n: int = _SERVE.max_n
    max_tokens: int = _SERVE.max_tokens
    max_messages: int = _SERVE.max_messages
    max_text_chars: int = _SERVE.max_text_chars

    @classmethod
    def from_config(cls, cfg: Config) -> Limits:
        s = cfg.serve
        return cls(
            max_image_bytes=s.max_image_bytes,
            max_image_pixels=s.max_image_pixels,
            max_question_chars=min(CHARS_PER_TOKEN * cfg.sampling.max_model_len, s.max_text_chars),
            max_body_bytes=s.max_body_bytes,
            max_n=s.max_n,
            max_tokens=s.max_tokens,
            max_messages=s.max_messages,
            max_text_chars=s.max_text_chars,
        )


@dataclass(frozen=True)
class AnswerRequest:
    image: bytes
    question: str
    mode: str


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
    if value[:5].lower() == "data:" and not match:
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


# --- bodies ------------------------------------------------------------------------------------------


async def read_body(request: Request, limits: Limits) -> dict[str, Any]:
    """The JSON object of a request, refusing an oversized body before reading it when its length is declared."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise ApiError(413, f"request body too large: {declared} bytes > {limits.max_body_bytes}")
    raw = await request.body()
    if len(raw) > limits.max_body_bytes:
        raise ApiError(413, f"request body too large: {len(raw)} bytes > {limits.max_body_bytes}")
    return parse_json(raw)


# --- guards in front of every route (ASGI middleware) --------------------------------------------------

RETRY_AFTER_S = 2
"""What a 503 asks a client to wait: long enough for a queue of short answers to drain, short enough that a
retrying client does not idle."""


def route_path(scope: Scope) -> str:
    """The request's path inside the app (without a `root_path` the server mounted it under)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return (path[len(root) :] or "/") if root and path.startswith(root) else path


async def send_body(
    send: Send, status: int, body: bytes, content_type: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    start = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": start + (headers or [])})
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send,
    status: int,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    kind: str | None = None,
) -> None:
    """An error in OpenAI's shape, from a middleware (FastAPI's exception handlers sit inside them)."""
    await send_body(send, status, json.dumps(error_body(status, message, kind=kind)).encode(), "application/json",
                    headers)  # fmt: skip


class BodyTooLarge(Exception):
    """Raised into the app when the body it is reading passes the limit (its answer is replaced by a 413)."""


class BodyLimit:
    """Refuse a request body over `max_bytes` with 413 as it streams in: from a declared Content-Length
    before a byte is read, else counted chunk by chunk (a chunked body declares no length), so no body is
    read past the limit. A middleware in front of everything because FastAPI reads and parses a body before
    the route runs (a check in the route comes after the whole body is in memory); it covers the demo's
    uploads too. Whatever the app answers to the cut-off body is replaced by the 413."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _message(self, size: int | str) -> str:
        return f"request body too large: {size} bytes > max_body_bytes {self.max_bytes}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, 413, self._message(declared))
            return
        seen, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise BodyTooLarge(self._message(f"more than {self.max_bytes}"))
            return message

        async def sent(message: Message) -> None:
            nonlocal started
            if over:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sent)
        except Exception:
            if not over:
                raise
        if over and not started:
            await send_error(send, 413, self._message(f"more than {self.max_bytes}"))
        elif over:  # the app had answered before reading its body: end that answer
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class Admission:
    """Bound what the model routes hold (`paths`, POST): at most `limit` requests in the ingress at once,
    counted from arrival (a slow upload holds a place as much as a long generation); one more is answered 503
    with Retry-After at once instead of waiting without bound behind the others. Each admitted request gets
    `timeout_s`: past it the call is cancelled (the engine's request with it) and answered 504, or, when
    its answer is already streaming, the stream is ended."""

    def __init__(self, app: ASGIApp, *, paths: frozenset[str], limit: int, timeout_s: float) -> None:
        self.app, self.paths, self.limit, self.timeout_s = app, paths, limit, timeout_s
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or route_path(scope) not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            message = f"server busy: {self.in_flight} requests in flight (limit {self.limit}); retry in {RETRY_AFTER_S} s"
            await send_error(send, 503, message, [(b"retry-after", str(RETRY_AFTER_S).encode())])
            return
        self.in_flight += 1
        started = False

        async def sent(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        timer = asyncio.timeout(self.timeout_s)
        try:
            async with timer:
                await self.app(scope, receive, sent)
        except TimeoutError:
            if not timer.expired():
                raise
            if started:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await send_error(
                    send, 504, f"request timed out after {self.timeout_s:g} s (serve.request_timeout_s)"
                )
        finally:
            self.in_flight -= 1
