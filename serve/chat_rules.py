"""The refusal-aware rules of the OpenAI route, apart from the ingress so they test without Ray.

Request side: at most one image, only as a `data:` URL, decodable and within the limits, padded to a square
as LLaVA-1.5 sees it when `model.image_aspect` is pad; the last user turn rendered by the project's renderer
(left alone when already rendered); BOS kept (`with_bos`).
Response side: `refused` on every choice (and on each streamed choice's last chunk), the confidence of K
samples. `serve/llm_ingress.py` applies them.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest

from inbol_ray.boundary.agreement import answer_agreement
from inbol_ray.boundary.construct import most_frequent
from inbol_ray.config import Config
from inbol_ray.data.images import decode_image, to_model_image
from inbol_ray.model.prompt import render_prompt
from inbol_ray.refusal import is_refusal
from serve.api import ApiError, Limits, decode_image_field

# --- the request side -------------------------------------------------------------------------------------


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
        if not isinstance(url, str) or not url.startswith("data:"):
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
