"""The OpenAI chat protocol of an engine that answers in one piece (the transformers engine).

Ray's ingress (`serve/llm_ingress.py`) calls every engine deployment the same way: `chat(body, raw)` is an
async generator whose first item decides the reply: an `ErrorResponse` (the ingress answers its status), a
`ChatCompletionResponse` (JSON), or `ChatCompletionStreamResponse` chunks (server-sent events). vLLM's
server makes them from its engine; this module makes them for `serve/transformers_server.py`, whose
generation (the project's batch-invariant `model.generation`) returns whole answers. A stream therefore
carries each choice in one content chunk, framed as vLLM frames it (a role chunk, the content, the
finish_reason, a usage chunk last when `stream_options.include_usage`): clients read both engines with the
same code; only the timing differs, and the answers are a word or phrase.

Apart from the engine because nothing here needs a model: the rules test in milliseconds.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from serve.ray_llm import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ErrorResponse,
)

NEUTRAL = {
    "logprobs": (False,),
    "top_logprobs": (0,),
    "tools": ([],),
    "response_format": (),
    "logit_bias": ({},),
    "use_beam_search": (False,),
    "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,),
    "repetition_penalty": (1.0,),
    "top_k": (0, -1),
    "min_p": (0.0,),
    "min_tokens": (0,),
    "ignore_eos": (False,),
    "echo": (False,),
    "continue_final_message": (False,),
    "add_generation_prompt": (True,),
}
"""Request fields this engine cannot honour, with the values that ask nothing of it (None always does).
Another value is refused (400) rather than ignored: the client would get an answer the vLLM engine would
not have given."""


class RequestError(Exception):
    """A request this engine refuses; it becomes an `ErrorResponse`, which the ingress answers with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None) -> ErrorResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return ErrorResponse.model_validate(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}
    )


# --- the request ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """The one question the project's prompt format holds (`model.prompt.format_prompt`)."""

    system: str | None
    """The system line the conversation opens with (None: no system message was sent)."""
    text: str
    """The user's text as the ingress left it (rendered with the project's instruction unless `render` false)."""
    image: bytes | None
    """The user's image (None: a text-only question)."""


def _parts(content: Any) -> list[Any]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)  # a list, or pydantic's iterator when the ingress did not materialise it


def _text(parts: Sequence[Any]) -> str:
    return " ".join(str(p.get("text", "")) for p in parts if isinstance(p, dict) and p.get("type") == "text")


def _image(url: Any) -> bytes:
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url.startswith("data:") or "," not in url:
        raise RequestError(400, "image_url must be a base64 data: URL", "messages")
    try:
        return base64.b64decode(url.split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "image_url: not valid base64", "messages") from None


def read_turn(messages: Sequence[Any]) -> Turn:
    """System (or developer) messages first, then exactly one user message with at most one image.

    That is the conversation every stage asks and the project's prompt format holds. Earlier turns are
    refused (400), not dropped: the format has no place for them, and an answer that silently ignored them
    would not be the one the vLLM engine (the checkpoint's chat template over every turn) gives.
    """
    messages = [m if isinstance(m, dict) else m.model_dump() for m in messages]
    systems = []
    while messages and messages[0].get("role") in ("system", "developer"):
        systems.append(_text(_parts(messages.pop(0).get("content"))))
    if len(messages) != 1 or messages[0].get("role") != "user":
        roles = [m.get("role") for m in messages]
        raise RequestError(
            400,
            f"the transformers engine answers one user message (after optional system messages), got {roles}: "
            "send the question alone, or serve the model with vLLM for multi-turn chats",
            "messages",
        )
    parts = _parts(messages[0].get("content"))
    urls = [p.get("image_url") for p in parts if isinstance(p, dict) and p.get("type") == "image_url"]
    if len(urls) > 1:
        raise RequestError(400, f"send at most one image_url, got {len(urls)}", "messages")
    return Turn(
        system=" ".join(systems) if systems else None,
        text=_text(parts),
        image=_image(urls[0]) if urls else None,
    )


@dataclass(frozen=True)
class Decoding:
    """How to decode one request's choices."""

    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    stop: tuple[str, ...]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def read_decoding(body: ChatCompletionRequest, max_tokens: int, defaults: Mapping[str, float]) -> Decoding:
    """The request's decoding, with vLLM's precedence: the client's value, else the checkpoint's generation
    config (`defaults`), else OpenAI's (temperature 1, top_p 1). `max_tokens` (`serve.max_tokens`) is both
    the default and the cap of new tokens per choice."""
    for name, neutral in NEUTRAL.items():
        value = getattr(body, name, None)
        if value is not None and value not in neutral:
            raise RequestError(400, f"'{name}' is not supported by the transformers engine", name)
    temperature = body.temperature if body.temperature is not None else defaults.get("temperature", 1.0)
    top_p = body.top_p if body.top_p is not None else defaults.get("top_p", 1.0)
    if temperature < 0:
        raise RequestError(400, f"temperature must be >= 0, got {temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise RequestError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    n = 1 if body.n is None else body.n
    if n < 1:
        raise RequestError(400, f"n must be >= 1, got {n}", "n")
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if asked is not None and asked < 1:
        raise RequestError(400, f"max_tokens must be >= 1, got {asked}", "max_tokens")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return Decoding(
        n=n,
        temperature=float(temperature),
        top_p=float(top_p),
        max_tokens=min(asked or max_tokens, max_tokens),
        seed=body.seed,
        stop=tuple(s for s in stop if s),
    )


# --- the response -----------------------------------------------------------------------------------------


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string (excluded, as vLLM does), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


@dataclass(frozen=True)
class Answer:
    """One request's choices, with what `usage` and `finish_reason` report."""

    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: list[int]

    def usage(self) -> dict[str, int]:
        done = sum(self.completion_tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}  # fmt: skip


def completion(model: str, answer: Answer) -> ChatCompletionResponse:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        for i, (text, reason) in enumerate(zip(answer.texts, answer.finish_reasons, strict=True))
    ]
    return ChatCompletionResponse.model_validate(
        {"model": model, "choices": choices, "usage": answer.usage()}
    )


def stream(model: str, answer: Answer, include_usage: bool) -> list[ChatCompletionStreamResponse]:
    """The chunks of a streamed reply: per choice its role, its content and its finish_reason; then the usage
    (no choices) when asked for. One id and timestamp for all, as OpenAI's streams have."""
    first = ChatCompletionStreamResponse.model_validate({"model": model, "choices": []})

    def chunk(
        choices: list[dict[str, Any]], usage: dict[str, int] | None = None
    ) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse.model_validate(
            {"id": first.id, "created": first.created, "model": model, "choices": choices, "usage": usage}
        )

    chunks = []
    for i, (text, reason) in enumerate(zip(answer.texts, answer.finish_reasons, strict=True)):
        chunks.append(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}}]))
        if text:
            chunks.append(chunk([{"index": i, "delta": {"content": text}}]))
        chunks.append(chunk([{"index": i, "delta": {}, "finish_reason": reason}]))
    if include_usage:
        chunks.append(chunk([], answer.usage()))
    return chunks
