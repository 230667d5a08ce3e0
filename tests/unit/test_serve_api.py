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
from fastapi import FastAPI, Request
from PIL import Image
from starlette.responses import StreamingResponse

from inbol_ray.config import Config
from serve import api
from serve.api import ApiError, Limits, parse_answer_request

LIMITS = Limits(
    max_image_bytes=20_000, max_image_pixels=100 * 100, max_question_chars=200, max_body_bytes=100_000
)


def png(width: int = 32, height: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG_B64 = base64.b64encode(png()).decode()


def chat_body(*parts: dict, **extra: Any) -> dict[str, Any]:
    return {"model": "x", "messages": [{"role": "user", "content": list(parts)}], **extra}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


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
def test_bad_answer_requests(body: dict, status: int, param: str, needle: str) -> None:
    """`/v1/answer`'s parsing: each bad body is refused with its status, field and reason before any model
    call (the route calls the model only with what this returns)."""
    with pytest.raises(ApiError) as refused:
        parse_answer_request(body, LIMITS)
    err = refused.value.body()["error"]
    assert err["param"] == param and needle in err["message"] and err["code"] == status


def test_answer_request_accepts_data_urls_and_wrapped_base64() -> None:
    wrapped = "\n".join(PNG_B64[i : i + 60] for i in range(0, len(PNG_B64), 60))
    for image in ("data:image/png;base64," + PNG_B64, wrapped):
        req = parse_answer_request({"image": image, "question": "q"}, LIMITS)
        assert req.image == png() and req.mode == "answer"


def test_api_error_body_is_openai_shaped() -> None:
    assert ApiError(422, "bad", "image").body() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "image", "code": 422}
    }
    assert ApiError(503, "busy").body()["error"]["type"] == "server_error"


def test_limits_come_from_the_config() -> None:
    cfg = Config()
    s = cfg.serve
    limits = Limits.from_config(cfg)
    assert limits.max_image_bytes == s.max_image_bytes and limits.max_image_pixels == s.max_image_pixels
    assert limits.max_question_chars == min(
        api.CHARS_PER_TOKEN * cfg.sampling.max_model_len, s.max_text_chars
    )
    assert (limits.max_body_bytes, limits.max_n, limits.max_tokens) == (
        s.max_body_bytes,
        s.max_n,
        s.max_tokens,
    )
    assert (limits.max_messages, limits.max_text_chars) == (s.max_messages, s.max_text_chars)
    assert limits.max_body_bytes > 4 * s.max_image_bytes // 3  # a maximal image fits, base64-encoded


# --- the OpenAI route's rules (serve/chat_rules.py): one set for every part shape and role ------------

RULES = Limits(max_image_bytes=20_000, max_image_pixels=100 * 100, max_question_chars=200, max_n=4,
               max_tokens=16, max_messages=3, max_text_chars=100)  # fmt: skip
DATA_URL = "data:image/png;base64," + PNG_B64


def chat(*parts: Any, role: str = "user", **extra: Any) -> dict[str, Any]:
    return {"model": "cadpo", "messages": [{"role": role, "content": list(parts)}], **extra}


def first_part(kind: str, value: Any) -> dict[str, Any]:
    return chat({"type": kind, kind: value}, text("q"))


@pytest.mark.parametrize(
    ("body", "status", "param", "needle"),
    [
        # every part shape vLLM's parser takes besides text and a typed data: image_url (some it fetches)
        (chat(text("q"), {"image_url": "http://127.0.0.1:9/x.png"}), 422, "messages[0].content[1]", "no 'type'"),
        (chat({"image_url": {"url": DATA_URL}}), 422, "messages[0].content[0]", "no 'type'"),
        (chat({"text": "q"}), 422, "messages[0].content[0]", "no 'type'"),
        (first_part("input_image", DATA_URL), 422, "messages[0].content[0]", "'input_image' is not accepted"),
        (first_part("image_pil", "x"), 422, "messages[0].content[0]", "'image_pil'"),
        (first_part("image_embeds", "x"), 422, "messages[0].content[0]", "'image_embeds'"),
        (first_part("audio_url", {"url": "http://a/b.wav"}), 422, "messages[0].content[0]", "'audio_url'"),
        (first_part("input_audio", {"data": "AA==", "format": "wav"}), 422, "messages[0].content[0]", "'input_audio'"),
        (first_part("video_url", {"url": "http://a/b.mp4"}), 422, "messages[0].content[0]", "'video_url'"),
        (first_part("file", {"file_data": "AA=="}), 422, "messages[0].content[0]", "'file'"),
        (chat("just a string part"), 422, "messages[0].content[0]", "must be an object"),
        (chat(image_url("http://10.0.0.1/x.png"), text("q")), 422, "messages[0].content[0]", "data: URL"),
        (chat(image_url("file:///etc/passwd"), text("q")), 422, "messages[0].content[0]", "data: URL"),
        (chat({"type": "image_url", "image_url": DATA_URL}), 422, "messages[0].content[0]", "{'url'"),
        (chat({"type": "image_url", "image_url": {"url": DATA_URL, "uuid": "x"}}), 422, "messages[0].content[0]",
         "{'url'"),
        (chat({"type": "image_url", "image_url": {"url": DATA_URL, "detail": "max"}}), 422,
         "messages[0].content[0]", "detail"),
        (chat({"type": "text", "text": "q", "cache_control": {}}), 422, "messages[0].content[0]", "cache_control"),
        (chat({"type": "text", "text": 7}), 422, "messages[0].content[0]", "must be a string"),
        # the same rules in every role
        (chat({"image_url": "http://127.0.0.1:9/x"}, role="system"), 422, "messages[0].content[0]", "no 'type'"),
        (chat(image_url("https://example.com/x.png"), role="assistant"), 422, "messages[0].content[0]",
         "data: URL"),
        ({"messages": [{"role": "system", "content": [image_url(DATA_URL)]},
                       {"role": "user", "content": [image_url(DATA_URL), text("q")]}]}, 422, "messages",
         "at most one image_url"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, 422, "messages[0]", "field(s)"),
        ({"messages": [{"role": "developer", "content": "x"}]}, 422, "messages[0]", "role must be one of"),
        ({"messages": [{"role": "user", "content": "x", "name": "eve"}]}, 422, "messages[0]", "name"),
        ({"messages": [{"role": "user", "content": []}]}, 422, "messages[0]", "non-empty array"),
        ({"messages": [{"role": "user", "content": None}]}, 422, "messages[0]", "non-empty array"),
        ({"messages": []}, 422, "messages", "non-empty array"),
        ({"messages": [{"role": "user", "content": "x"}] * 4}, 422, "messages", "max_messages 3"),
        ({"messages": [{"role": "user", "content": "x" * 60}, {"role": "user", "content": [text("y" * 41)]}]},
         413, "messages", "max_text_chars 100"),
        # caps and refused sampling fields
        (chat(text("q"), n=10000), 422, "n", "from 1 to 4 (serve.max_n)"),
        (chat(text("q"), n=0), 422, "n", "from 1 to 4"),
        (chat(text("q"), n=True), 422, "n", "from 1 to 4"),
        (chat(text("q"), max_tokens=10**6), 422, "max_tokens", "from 1 to 16 (serve.max_tokens)"),
        (chat(text("q"), max_completion_tokens=17), 422, "max_completion_tokens", "serve.max_tokens"),
        (chat(text("q"), max_tokens="8"), 422, "max_tokens", "integer"),
        (chat(text("q"), ignore_eos=True), 422, "ignore_eos", "ignore_eos is refused"),
        (chat(text("q"), min_tokens=5), 422, "min_tokens", "min_tokens is refused"),
        (chat(text("q"), stop=["a", "b", "c", "d", "e"]), 422, "stop", "at most 4"),
        (chat(text("q"), stop="x" * 100), 413, "messages", "max_text_chars"),
        # engine knobs a public endpoint does not hand out
        (chat(text("q"), chat_template="{{ 7*7 }}"), 422, "chat_template", "not accepted here"),
        (chat(text("q"), mm_processor_kwargs={}), 422, "mm_processor_kwargs", "not accepted here"),
        (chat(text("q"), media_io_kwargs={"image": {}}), 422, "media_io_kwargs", "not accepted here"),
        (chat(text("q"), use_beam_search=True), 422, "use_beam_search", "not accepted here"),
        (chat(text("q"), prompt_logprobs=20), 422, "prompt_logprobs", "not accepted here"),
        # ours
        (chat(text("q"), confidence=True), 422, "n", "n >= 2"),
        (chat(text("q"), confidence=True, n=2, stream=True), 422, "stream", "does not stream"),
        (chat(text("q"), confidence="yes", n=2), 422, "confidence", "true or false"),
    ],
)  # fmt: skip
def test_the_chat_rules_refuse(body: dict, status: int, param: str, needle: str) -> None:
    from serve.chat_rules import check_chat_body

    with pytest.raises(ApiError) as err:
        check_chat_body(body, RULES)
    assert (err.value.status, err.value.param) == (status, param) and needle in err.value.message, (
        err.value.message
    )


def test_a_checked_chat_is_rebuilt_from_what_the_rules_allow() -> None:
    """The cleaned body holds only what the rules looked at; a request without a cap gets the cap, a refused
    field at its default is dropped, and the engine's request model takes the result."""
    from serve.chat_rules import chat_request, check_chat_body

    body = chat({"type": "image_url", "image_url": {"url": "DATA:image/png;base64," + PNG_B64, "detail": "low"}},
                text("What colour?"), ignore_eos=False, min_tokens=0, temperature=0.5, stop="\n", n=2,
                confidence=True)  # fmt: skip
    body["messages"].insert(0, {"role": "system", "content": "Be brief."})
    out = check_chat_body(body, RULES)
    assert out["max_tokens"] == RULES.max_tokens and "ignore_eos" not in out and "min_tokens" not in out
    assert out["messages"] == body["messages"] and out["messages"] is not body["messages"]
    assert out["confidence"] is True and out["temperature"] == 0.5
    given = check_chat_body(chat(text("q"), max_completion_tokens=4), RULES)
    assert "max_tokens" not in given and given["max_completion_tokens"] == 4
    out.pop("confidence")
    request = chat_request(out)
    assert request.max_tokens == RULES.max_tokens and request.n == 2
    with pytest.raises(ApiError) as err:
        chat_request({**out, "temperature": "hot"})
    assert err.value.status == 400 and err.value.param == "temperature"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height but whose pixel data stops after one row: refused for
    its size (not as undecodable) only if the size is read before any pixel is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\0" * (1 + 3 * width))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "status", "needle"),
    [
        (png_header_only(8000, 5000), 413, "8000x5000 pixels > max_image_pixels"),  # 40 Mpixel, header only
        (png(200, 200), 413, "pixels > max_image_pixels"),
        (b"\0" * 30_000, 413, "max_image_bytes"),
        (b"not an image", 422, "decodable"),
        (png()[:60], 422, "decodable"),
    ],
)
def test_chat_images_are_checked_before_their_pixels_are_decoded(
    data: bytes, status: int, needle: str
) -> None:
    from serve.chat_rules import prepare_chat_images

    url = "data:image/png;base64," + base64.b64encode(data).decode()
    messages = [{"role": "user", "content": [image_url(url), text("q")]}]
    with pytest.raises(ApiError) as err:
        prepare_chat_images(messages, RULES, (0, 0, 0))
    assert err.value.status == status and needle in err.value.message, err.value.message


# --- the guards in front of every route (ASGI middleware) ---------------------------------------------


def body_app() -> FastAPI:
    app = FastAPI()

    @app.post("/read")
    async def read(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    return app


def drive(app: Any, headers: list[tuple[bytes, bytes]], chunks: Any) -> tuple[list[dict], int]:
    """Run one POST through `app` at the ASGI level: the messages it sends, and how many body chunks it read."""
    import asyncio

    pulled = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1
        chunk = next(chunks, None)
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/read", "root_path": "", "headers": headers,
             "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 1)}  # fmt: skip
    asyncio.run(app(scope, receive, send))
    return sent, pulled


def test_a_chunked_body_is_refused_once_it_passes_the_limit_not_after() -> None:
    """No Content-Length (chunked): the body is counted as it streams in and refused with 413 at the chunk
    that passes the limit; the rest of an endless body is never read."""
    from itertools import repeat

    guarded = api.BodyLimit(body_app(), max_bytes=10_000)
    sent, pulled = drive(guarded, [(b"content-type", b"application/json")], repeat(b"x" * 1000))
    assert sent[0]["status"] == 413 and pulled == 11  # 11 KB read, of an infinite body
    assert b"max_body_bytes 10000" in sent[1]["body"] and len(sent) == 2  # the app's own answer is dropped
    sent, pulled = drive(guarded, [(b"content-length", b"20000000")], repeat(b"x" * 1000))
    assert sent[0]["status"] == 413 and pulled == 0  # a declared length: refused before a byte is read
    sent, _ = drive(guarded, [], iter([b"x" * 6000, b"x" * 4000]))
    assert sent[0]["status"] == 200 and b'"bytes":10000' in sent[1]["body"]  # at the limit: served


def test_model_requests_beyond_the_limit_get_503_and_retry_after_and_slow_ones_504() -> None:
    import asyncio

    import httpx

    app = FastAPI()
    release = asyncio.Event()

    @app.post("/v1/chat/completions")
    async def held() -> dict[str, str]:
        await release.wait()
        return {"ok": "yes"}

    @app.post("/v1/answer")
    async def slow() -> StreamingResponse:
        async def chunks():
            yield b"data: first\n\n"
            await asyncio.sleep(60)
            yield b"data: never\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/other")
    async def other() -> dict[str, str]:
        await asyncio.sleep(0.3)
        return {"ok": "yes"}

    paths = frozenset({"/v1/chat/completions", "/v1/answer"})
    guarded = api.Admission(app, paths=paths, limit=2, timeout_s=60)
    timed = api.Admission(app, paths=paths, limit=2, timeout_s=0.2)

    async def scenario() -> None:
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(guarded), base_url="http://t") as c,
            httpx.AsyncClient(transport=httpx.ASGITransport(timed), base_url="http://t") as t,
        ):
            held_calls = [asyncio.create_task(c.post("/v1/chat/completions")) for _ in range(2)]
            await asyncio.sleep(0.05)
            busy = await c.post("/v1/chat/completions")
            assert busy.status_code == 503 and busy.headers["retry-after"] == str(api.RETRY_AFTER_S)
            assert busy.json()["error"]["code"] == 503 and "limit 2" in busy.json()["error"]["message"]
            assert (await c.post("/other")).status_code == 200  # other routes are neither counted nor timed
            release.set()
            assert [r.status_code for r in await asyncio.gather(*held_calls)] == [200, 200]
            assert guarded.in_flight == 0
            release.clear()
            timed_out = await t.post("/v1/chat/completions")
            assert timed_out.status_code == 504 and "0.2 s" in timed_out.json()["error"]["message"]
            cut = await t.post("/v1/answer")  # streaming already: ended, not answered twice
            assert cut.status_code == 200 and cut.text == "data: first\n\n"
            assert (await t.post("/other")).status_code == 200  # not timed: not a model route
            assert timed.in_flight == 0

    asyncio.run(scenario())
