"""The transformers engine deployment, in this process (no Serve): the handle protocol Ray's ingress speaks
(`chat` yields an ErrorResponse, one ChatCompletionResponse or stream chunks; `check_health`), the answers
the project's generation gives for the same prompt, and the protocol rules of `serve/chat_protocol.py`.

The engine runs the tiny checkpoint for real; the ingress in front of it is tested over HTTP in
tests/integration/test_serve.py.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import threading
from pathlib import Path

import pytest

from inbol_ray.config import Config
from inbol_ray.model.prompt import render_prompt
from serve.chat_protocol import (
    Answer,
    RequestError,
    completion,
    cut_at_stop,
    read_decoding,
    read_turn,
    stream,
)
from serve.ray_llm import ChatCompletionRequest

MAX_TOKENS = 6


def _url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _messages(image: bytes | None, text: str, system: str | None = None) -> list[dict]:
    content = ([{"type": "image_url", "image_url": {"url": _url(image)}}] if image else []) + [
        {"type": "text", "text": text}
    ]
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": content}
    ]


# --- the protocol rules (no model) ------------------------------------------------------------------------


def test_a_turn_is_one_user_message_after_system_lines() -> None:
    turn = read_turn(_messages(b"png", "What is it?", system="Be brief."))
    assert (turn.system, turn.text, turn.image) == ("Be brief.", "What is it?", b"png")
    assert read_turn([{"role": "user", "content": "text only"}]) == read_turn(_messages(None, "text only"))
    assert read_turn([{"role": "user", "content": "q"}]).system is None
    bad = [
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
         "one user message"),
        ([{"role": "assistant", "content": "hi"}], "one user message"),
        ([{"role": "user", "content": [*_messages(b"x", "q")[0]["content"], *_messages(b"y", "q")[0]["content"]]}],
         "at most one image_url"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}], "data: URL"),
    ]  # fmt: skip
    for messages, match in bad:
        with pytest.raises(RequestError, match=match) as err:
            read_turn(messages)
        assert err.value.status == 400


def test_decoding_takes_the_clients_values_then_the_checkpoints_then_openais() -> None:
    def body(**kw) -> ChatCompletionRequest:
        return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "q"}], **kw)

    d = read_decoding(body(), max_tokens=16, defaults={})
    assert (d.n, d.temperature, d.top_p, d.max_tokens, d.seed, d.stop) == (1, 1.0, 1.0, 16, None, ())
    assert read_decoding(body(), 16, {"temperature": 0.2}).temperature == 0.2
    d = read_decoding(
        body(temperature=0, top_p=0.5, n=3, max_tokens=99, seed=7, stop="."), 16, {"temperature": 0.2}
    )
    assert (d.greedy, d.top_p, d.n, d.max_tokens, d.seed, d.stop) == (True, 0.5, 3, 16, 7, (".",))  # capped
    assert read_decoding(body(max_completion_tokens=4, max_tokens=9), 16, {}).max_tokens == 4
    assert read_decoding(body(repetition_penalty=1.0, top_k=-1, logprobs=False), 16, {}).n == 1  # neutral
    for kw, param in (({"logprobs": True}, "logprobs"), ({"top_k": 5}, "top_k"), ({"top_p": 0.0}, "top_p"),
                      ({"max_tokens": 0}, "max_tokens")):  # fmt: skip
        with pytest.raises(RequestError) as err:
            read_decoding(body(**kw), 16, {})
        assert err.value.status == 400 and err.value.param == param


def test_stop_strings_cut_the_answer_as_vllm_does() -> None:
    assert cut_at_stop("a red cube. yes", [" ", "."]) == ("a", True)
    assert cut_at_stop("red", ["."]) == ("red", False)


def test_a_reply_as_json_and_as_a_stream() -> None:
    answer = Answer(["red", ""], ["stop", "length"], prompt_tokens=20, completion_tokens=[2, 4])
    reply = completion("cadpo", answer).model_dump()
    assert [c["message"]["content"] for c in reply["choices"]] == ["red", ""]
    assert [c["finish_reason"] for c in reply["choices"]] == ["stop", "length"]
    assert reply["usage"]["total_tokens"] == 26 and reply["model"] == "cadpo"
    chunks = [c.model_dump() for c in stream("cadpo", answer, include_usage=True)]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    per_choice = [
        [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i] for i in (0, 1)
    ]
    assert per_choice[0][0]["delta"]["role"] == "assistant" and per_choice[0][1]["delta"]["content"] == "red"
    assert [c[-1]["finish_reason"] for c in per_choice] == ["stop", "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])
    assert stream("cadpo", answer, include_usage=False)[-1].usage is None


# --- the engine on the tiny checkpoint ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path, tiny_config: Config):
    from serve.transformers_server import TransformersServer

    serve_cfg = dataclasses.replace(tiny_config.serve, max_tokens=MAX_TOKENS, engine_hang_s=1.0)
    server = TransformersServer(str(tiny_checkpoint), dataclasses.replace(tiny_config, serve=serve_cfg))
    yield server
    server.close()


@pytest.fixture(scope="module")
def items(tiny_config: Config) -> list:
    from inbol_ray.data.shapes import generate

    shapes = dataclasses.replace(tiny_config.data.shapes, n_pretrain=0, n_train=0, n_val=0, n_id_test=3,
                                 n_ood_test=0, n_unanswerable_test=2)  # fmt: skip
    return list(generate(shapes, tiny_config.model.image_size))


def _chat(engine, messages: list[dict], **kw) -> list:
    async def collect() -> list:
        body = ChatCompletionRequest(model="m", messages=messages, **kw)
        return [x async for x in engine.chat(body, None)]

    return asyncio.run(collect())


def test_greedy_answers_are_the_evaluated_ones_and_concurrent_ones_share_a_call(
    engine, items, tiny_config
) -> None:
    """Concurrent greedy requests are batched (one engine call) and each gets exactly the answer the project's
    generation gives its prompt alone, with the request's system line."""
    from inbol_ray.model.generation import generate_responses

    prompts = [render_prompt(it.text, None, tiny_config.prompt) for it in items]
    calls = []
    original = engine._answer

    def counted(jobs):
        calls.append(len(jobs))
        return original(jobs)

    engine._answer = counted

    async def all_at_once() -> list:
        async def one(item, prompt):
            body = ChatCompletionRequest(
                model="m", messages=_messages(item.image, prompt, "Be brief."), temperature=0
            )
            return [x async for x in engine.chat(body, None)]

        return await asyncio.gather(*(one(it, p) for it, p in zip(items, prompts, strict=True)))

    try:
        replies = asyncio.run(all_at_once())
    finally:
        del engine._answer
    assert calls == [len(items)]
    model, processor = engine.sampler.model, engine.sampler.processor
    for item, prompt, (reply,) in zip(items, prompts, replies, strict=True):
        (expected,) = generate_responses(model, processor, [item.image], [prompt], max_new_tokens=MAX_TOKENS,
                                         image_aspect=tiny_config.model.image_aspect, system="Be brief.")[0]  # fmt: skip
        assert reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens > 0 and 1 <= reply.usage.completion_tokens <= MAX_TOKENS


def test_n_samples_follow_the_seed_and_a_stream_frames_them(engine, items) -> None:
    from inbol_ray.model.generation import generate_responses

    messages = _messages(items[0].image, items[0].text)
    (reply,) = _chat(engine, messages, temperature=1.0, n=3, seed=11)
    texts = [c.message.content for c in reply.choices]
    expected = generate_responses(engine.sampler.model, engine.sampler.processor, [items[0].image], [items[0].text],
                                  k=3, do_sample=True, max_new_tokens=MAX_TOKENS, seeds=[11],
                                  image_aspect=engine.sampler.image_aspect)[0]  # fmt: skip
    assert texts == expected and reply.usage.completion_tokens >= 3
    chunks = _chat(
        engine, messages, temperature=1.0, n=3, seed=11, stream=True, stream_options={"include_usage": True}
    )
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(3)]  # fmt: skip
    assert streamed == texts and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    (greedy,) = _chat(engine, messages, temperature=0, n=3)
    assert len({c.message.content for c in greedy.choices}) == 1  # one greedy answer for every choice


def test_max_tokens_ends_an_answer_with_length(engine, items) -> None:
    (reply,) = _chat(engine, _messages(items[1].image, items[1].text), temperature=0, max_tokens=1)
    choice = reply.choices[0]
    assert reply.usage.completion_tokens == 1
    assert choice.finish_reason == ("length" if choice.message.content else "stop")


def test_refusals_are_error_responses_with_a_status(engine, items) -> None:
    from serve.ray_llm import ChatCompletionRequest as Body

    history = [
        *_messages(items[0].image, "q"),
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "b"},
    ]
    for messages, kw, status in ((history, {}, 400), (_messages(None, "q"), {"logprobs": True}, 400)):
        (error,) = _chat(engine, messages, **kw)
        assert type(error).__name__ == "ErrorResponse" and error.error.code == status and error.error.message

    async def raw_prompt() -> list:
        return [x async for x in engine.completions(Body(model="m", messages=history), None)]

    (closed,) = asyncio.run(raw_prompt())
    assert closed.error.code == 404 and "chat/completions" in closed.error.message


def test_health_fails_while_an_engine_call_runs_past_engine_hang_s(engine) -> None:
    engine.check_health()
    release = threading.Event()

    async def wedge_and_probe() -> list[str]:
        call = asyncio.ensure_future(engine._in_engine(release.wait, 10))
        seen = []
        for wait in (0.05, 1.5):
            await asyncio.sleep(wait)
            try:
                engine.check_health()
                seen.append("healthy")
            except RuntimeError as exc:
                seen.append(str(exc))
        release.set()
        await call
        return seen

    seen = asyncio.run(wedge_and_probe())
    assert seen[0] == "healthy" and "engine_hang_s" in seen[1]  # busy is not hung; past engine_hang_s is
    engine.check_health()  # the call ended: healthy again


def test_a_closed_engine_is_unhealthy(tiny_checkpoint: Path, tiny_config: Config) -> None:
    from serve.transformers_server import TransformersServer

    server = TransformersServer(str(tiny_checkpoint), tiny_config)
    server.close()
    with pytest.raises(RuntimeError, match="closed"):
        server.check_health()
