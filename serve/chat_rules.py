"""The refusal-aware rules of the OpenAI route, apart from the ingress so they test without Ray.

Request side, one set of rules for every message and part, applied to the JSON the client sent before
anything reaches an engine (`check_chat_body`):
- fields: OpenAI's sampling fields and ours (`CHAT_FIELDS`); `n`, `max_tokens` within `serve.max_n` /
  `serve.max_tokens` (a request that sets none gets `serve.max_tokens`); `ignore_eos` and `min_tokens`
  refused (they make a replica generate to the cap whatever the model says); every other engine knob vLLM's
  protocol accepts (a chat template of the client's own, processor and media-loading settings, structured
  outputs, beam search, logit bias, KV transfer...) refused by name;
- messages: at most `serve.max_messages`, roles system/user/assistant, content a string or a list of parts,
  at most `serve.max_text_chars` characters of text in all;
- parts: exactly `{"type": "text", "text"}` or `{"type": "image_url", "image_url": {"url", "detail"?}}`,
  in every role. vLLM's parser also takes untyped parts (`{"image_url": "http://..."}`), `input_image`,
  `image_pil`, `image_embeds`, audio, video and file parts, and fetches http(s) URLs for the server: each
  is a 422 naming the message and part;
- images: at most one in the conversation (LLaVA-1.5 sees one), a `data:` URL (the server fetches
  nothing), decodable and within `max_image_bytes` and `max_image_pixels` (the header's dimensions are
  checked before the pixels are decoded), padded to a square as LLaVA-1.5 sees it when `model.image_aspect`
  is pad (`prepare_chat_images`, run off the event loop by the ingress);
- the last user turn rendered by the project's renderer (left alone when already rendered); BOS kept
  (`with_bos`).
The cleaned messages are rebuilt from the allowed keys only, so nothing the rules did not look at reaches
the engine.
Response side: `refused` on every choice (and on each streamed choice's last chunk), the confidence of K
samples. `serve/llm_ingress.py` applies them.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from pydantic import ValidationError

from inbol_ray.boundary.agreement import answer_agreement
from inbol_ray.boundary.construct import most_frequent
from inbol_ray.config import Config
from inbol_ray.data.images import decode_image, to_model_image
from inbol_ray.model.prompt import render_prompt
from inbol_ray.refusal import is_refusal
from serve.api import ApiError, Limits, decode_image_field
from serve.ray_llm import ChatCompletionRequest

# --- the request side -------------------------------------------------------------------------------------

SAMPLING_FIELDS = frozenset({
    "model", "messages", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "seed", "stop", "stream", "stream_options", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "logprobs", "top_logprobs", "user", "add_special_tokens",
})  # fmt: skip
OUR_FIELDS = frozenset({"confidence", "render"})
CHAT_FIELDS = SAMPLING_FIELDS | OUR_FIELDS
"""What a chat request may set. An allow-list: vLLM's request model accepts ~70 fields, and a new vLLM adds
more; an engine knob nobody reviewed must not become reachable by upgrading."""
REFUSED = {
    "ignore_eos": "ignore_eos is refused: it makes a replica generate max_tokens whatever the model says",
    "min_tokens": "min_tokens is refused: it makes a replica generate past the model's answer",
}
"""Sampling fields refused when set (their default, false / 0, is accepted and dropped)."""
ROLES = ("system", "user", "assistant")
DETAILS = ("auto", "low", "high")
MAX_STOP = 4
"""Stop strings per request (OpenAI's limit)."""


def _count(body: dict[str, Any], key: str, high: int, setting: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ApiError(
            422, f"field '{key}' must be an integer from 1 to {high} ({setting}), got {value!r}", key
        )
    return value


def check_chat_body(body: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """The chat request as it may reach the engine, or an `ApiError` naming what is wrong (see the module
    docstring). Cheap checks only: images are decoded by `prepare_chat_images`."""
    for key, value in body.items():
        if key in REFUSED:
            if value not in (None, False, 0):
                raise ApiError(422, REFUSED[key], key)
        elif key not in CHAT_FIELDS:
            raise ApiError(
                422, f"field '{key}' is not accepted here; accepted: {', '.join(sorted(CHAT_FIELDS))}", key
            )
    out = {k: v for k, v in body.items() if k not in REFUSED}
    n = _count(body, "n", limits.max_n, "serve.max_n") or 1
    tokens = [
        _count(body, k, limits.max_tokens, "serve.max_tokens")
        for k in ("max_tokens", "max_completion_tokens")
    ]
    if tokens == [None, None]:
        out["max_tokens"] = limits.max_tokens  # vLLM's default is the whole context left
    for key in OUR_FIELDS:
        if not isinstance(body.get(key, True), bool):
            raise ApiError(422, f"field '{key}' must be true or false", key)
    if body.get("confidence") and n < 2:
        raise ApiError(422, "confidence needs n >= 2 samples (set n to K)", "n")
    if body.get("confidence") and body.get("stream"):
        raise ApiError(422, "confidence mode does not stream (it reads all K samples at once)", "stream")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and (
        not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) for s in stops)
    ):
        raise ApiError(422, f"field 'stop' must be a string or at most {MAX_STOP} strings", "stop")
    out["messages"] = check_messages(body.get("messages"), limits, extra_chars=sum(map(len, stops or [])))
    return out


def check_messages(messages: Any, limits: Limits, extra_chars: int = 0) -> list[dict[str, Any]]:
    """The messages rebuilt from their allowed keys, or an `ApiError` naming the message and part."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(422, "field 'messages' must be a non-empty array", "messages")
    if len(messages) > limits.max_messages:
        raise ApiError(
            422,
            f"{len(messages)} messages > max_messages {limits.max_messages} (serve.max_messages)",
            "messages",
        )
    out = [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    chars = extra_chars + sum(len(text) for m in out for text in _texts(m["content"]))
    if chars > limits.max_text_chars:
        raise ApiError(
            413, f"{chars} characters of text (messages and stop strings) > max_text_chars "
            f"{limits.max_text_chars} (serve.max_text_chars)",
            "messages",
        )  # fmt: skip
    images = [url for m in out for url in _image_urls(m["content"])]
    if len(images) > 1:
        raise ApiError(
            422, f"send at most one image_url (this model sees one image), got {len(images)}", "messages"
        )
    return out


def _texts(content: str | list[dict[str, Any]]) -> list[str]:
    return [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]


def _message(message: Any, param: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise ApiError(422, f"{param} must be an object with role and content", param)
    unknown = sorted(set(message) - {"role", "content"})
    if unknown:
        raise ApiError(
            422, f"{param}: field(s) {', '.join(unknown)} not accepted (only role and content)", param
        )
    role = message.get("role")
    if role not in ROLES:
        raise ApiError(422, f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}", param)
    content = message.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list) or not content:
        raise ApiError(422, f"{param}.content must be a string or a non-empty array of parts", param)
    return {"role": role, "content": [_part(p, f"{param}.content[{j}]") for j, p in enumerate(content)]}


def _part(part: Any, param: str) -> dict[str, Any]:
    """One content part, exactly as the rules allow it."""
    shapes = "{'type': 'text', 'text': ...} or {'type': 'image_url', 'image_url': {'url': 'data:...'}}"
    if not isinstance(part, dict):
        raise ApiError(422, f"{param} must be an object: {shapes}", param)
    kind = part.get("type")
    if kind is None:
        raise ApiError(422, f"{param} has no 'type'; a part is {shapes}", param)
    if kind not in ("text", "image_url"):
        raise ApiError(422, f"{param}: part type {kind!r} is not accepted; a part is {shapes}", param)
    unknown = sorted(set(part) - {"type", kind})
    if unknown:
        raise ApiError(422, f"{param}: field(s) {', '.join(unknown)} not accepted in a {kind} part", param)
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ApiError(422, f"{param}.text must be a string", param)
        return {"type": "text", "text": part["text"]}
    field = part.get("image_url")
    if not isinstance(field, dict) or not isinstance(field.get("url"), str) or set(field) - {"url", "detail"}:
        raise ApiError(422, f"{param}.image_url must be {{'url': 'data:...', 'detail'?}}", param)
    if field["url"][:5].lower() != "data:":
        raise ApiError(422, f"{param}: image_url must be a data: URL; the server fetches nothing", param)
    if field.get("detail", "auto") not in DETAILS:
        raise ApiError(422, f"{param}.image_url.detail must be one of {', '.join(DETAILS)}", param)
    return {"type": "image_url", "image_url": dict(field)}


def chat_request(body: dict[str, Any]) -> ChatCompletionRequest:
    """The engine's request model of a checked body (`check_chat_body`); a mistyped field is a 400."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(x) for x in error.get("loc", ())) or "body"
        raise ApiError(400, f"invalid request: {where}: {error.get('msg')}", where.split(".")[0]) from None


def prepare_chat_images(
    messages: list[dict[str, Any]], limits: Limits, background: tuple[int, int, int] | None
) -> None:
    """Decode-check the image (`check_chat_images`) and pad it (`pad_chat_images`): the CPU-heavy half of
    the rules, in one call the ingress runs off its event loop."""
    check_chat_images(messages, limits)
    pad_chat_images(messages, limits, background)


def _image_urls(content: Any) -> list[str]:
    if not isinstance(content, list):
        return []
    urls = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image_url":
            url = part.get("image_url")
            urls.append(url.get("url") if isinstance(url, dict) else url)
    return urls


def check_chat_images(messages: Sequence[dict[str, Any]], limits: Limits) -> None:
    """At most one image in the whole conversation, as a `data:` URL, decodable and within the limits."""
    urls = [url for m in messages for url in _image_urls(m.get("content"))]
    if len(urls) > 1:
        raise ApiError(
            422, f"send at most one image_url (this model sees one image), got {len(urls)}", "messages"
        )
    for url in urls:
        if not isinstance(url, str) or url[:5].lower() != "data:":
            raise ApiError(422, "image_url must be a data: URL; the server fetches nothing", "messages")
        decode_image_field(url, limits, "messages")


def pad_chat_images(
    messages: list[dict[str, Any]], limits: Limits, background: tuple[int, int, int] | None
) -> None:
    """Replace each `image_url` by the picture LLaVA-1.5 is shown (`model.image_aspect` pad: centred on a
    square of `background`, `data.images.to_model_image`), as a PNG data URL (lossless: vLLM decodes the
    very pixels the other engines see). vLLM's OpenAI server runs the processor as shipped, whose centre
    crop would cut a wide photo's edges, so the ingress pads first. `background` None (`crop`): as sent.
    Run after `check_chat_images`."""
    if background is None:
        return
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = [_padded_part(part, limits, background) for part in content]


def _padded_part(part: Any, limits: Limits, background: tuple[int, int, int]) -> Any:
    if not (isinstance(part, dict) and part.get("type") == "image_url"):
        return part
    field = part.get("image_url")
    url = field.get("url") if isinstance(field, dict) else field
    image = decode_image(decode_image_field(url, limits, "messages"))
    padded = to_model_image(image, "pad", background)
    if padded is image:  # square: already what the model sees
        return part
    buf = io.BytesIO()
    padded.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {**part, "image_url": {**field, "url": url} if isinstance(field, dict) else url}


def _rendered(text: str, cfg: Config) -> str:
    """The project's prompt for a user question, left alone when the client already rendered it."""
    stripped = text.strip()
    if stripped.endswith((cfg.prompt.short_answer, cfg.prompt.multiple_choice)):
        return stripped
    return render_prompt(stripped, None, cfg.prompt)


def last_user_message(messages: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The message that holds the question: the last one with role `user`."""
    return next((m for m in reversed(messages) if m.get("role") == "user"), None)


def _text_parts(content: Any) -> list[dict[str, Any]]:
    return (
        [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if isinstance(content, list)
        else []
    )


def last_user_text(messages: Sequence[dict[str, Any]]) -> str | None:
    """The question as the client sent it (string content, or its text parts joined)."""
    message = last_user_message(messages)
    if message is None:
        return None
    content = message.get("content")
    if isinstance(content, str):
        return content
    return (
        " ".join(str(p.get("text", "")) for p in _text_parts(content)) if isinstance(content, list) else None
    )


def render_last_user_turn(messages: list[dict[str, Any]], cfg: Config) -> None:
    """Render the last user message's text in place (string content or its text parts, joined)."""
    message = last_user_message(messages)
    if message is None:
        raise ApiError(422, "no user message: the last user message holds the question", "messages")
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = _rendered(content, cfg)
    elif texts := _text_parts(content):
        others = [p for p in content if p not in texts]
        message["content"] = [
            *others,
            {"type": "text", "text": _rendered(last_user_text(messages) or "", cfg)},
        ]


def with_system_line(messages: list[dict[str, Any]], system: str) -> None:
    """Open the conversation with `prompt.system` (LLaVA-1.5's vicuna_v1 line in the LLaVA configs) unless the
    client sent a system message of its own: the model was sampled, trained and evaluated after that line,
    and the checkpoint's chat template writes a system message's text before "USER:" as the project's
    `format_prompt` does."""
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})


def with_bos(body: ChatCompletionRequest) -> None:
    """Tokenise the chat with the tokenizer's special tokens (BOS), unless the client chose: vLLM's chat
    route leaves them to the chat template, and LLaVA-1.5's template (llava-hf's, and the tiny checkpoint's)
    has no BOS, while every other stage tokenises the same text with it. Without this the served model
    answered other questions than the evaluated one (different greedy answers from the first token)."""
    if "add_special_tokens" not in body.model_fields_set:
        body.add_special_tokens = True


# --- the response side ------------------------------------------------------------------------------------


def choice_text(choice: dict[str, Any]) -> str:
    message = choice.get("message")
    if isinstance(message, dict):
        return str(message.get("content") or "")
    return str(choice.get("text") or "")


def confidence_of(samples: Sequence[str], question: str | None = None) -> dict[str, Any]:
    """The K samples' majority answer, the share agreeing with it (refusals agree with refusals), and
    whether it is a refusal: the serving-time reading of InBoL's confidence (no gold answer here)."""
    refusals = [s for s in samples if is_refusal(s, question=question)]
    answers = [s for s in samples if not is_refusal(s, question=question)]
    answer = refusals[0] if len(refusals) > len(answers) else (most_frequent(answers) or "")
    return {
        "answer": answer,
        "agreement": answer_agreement(answer, samples),
        "refused": is_refusal(answer, question=question),
        "samples": list(samples),
    }


def annotate(result: dict[str, Any], question: str | None, confidence: bool) -> dict[str, Any]:
    """`refused` on each choice; `confidence` over the choices when asked for."""
    texts = []
    for choice in result.get("choices") or []:
        text = choice_text(choice)
        choice["refused"] = is_refusal(text, question=question)
        texts.append(text)
    if confidence:
        result["confidence"] = confidence_of(texts, question)
    return result


async def annotate_stream(chunks: AsyncIterator[str | bytes], question: str | None) -> AsyncIterator[str]:
    """The SSE stream with `refused` on each choice's last chunk (the one carrying its finish_reason)."""
    texts: dict[int, list[str]] = {}
    pending = ""
    async for chunk in chunks:
        pending += chunk.decode() if isinstance(chunk, bytes) else chunk
        *events, pending = pending.split("\n\n")
        out = []
        for event in events:
            out.append(_annotated_event(event, texts, question))
        if out:
            yield "".join(out)
    if pending:
        yield pending


def _annotated_event(event: str, texts: dict[int, list[str]], question: str | None) -> str:
    if not event.startswith("data: ") or event == "data: [DONE]":
        return event + "\n\n"
    try:
        data = json.loads(event[len("data: ") :])
    except json.JSONDecodeError:
        return event + "\n\n"
    for choice in data.get("choices") or []:
        index = int(choice.get("index", 0))
        delta = choice.get("delta")
        piece = (delta or {}).get("content") if isinstance(delta, dict) else choice.get("text")
        texts.setdefault(index, []).append(piece or "")
        if choice.get("finish_reason") is not None:
            choice["refused"] = is_refusal("".join(texts[index]), question=question)
    return f"data: {json.dumps(data)}\n\n"
