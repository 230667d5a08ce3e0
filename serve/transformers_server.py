"""The transformers engine deployment: one checkpoint behind the same ingress as vLLM's deployments.

For checkpoints vLLM has no implementation of and machines without a working vLLM engine. It speaks the
handle protocol Ray's `OpenAiIngress` speaks to its `LLMServer`s, so `serve/llm_ingress.py` (names,
prompt rendering, image rules, refusal flags, confidence, `/v1/answer`, health, the demo) serves both
engines with one set of rules:
- `chat(body, raw_request_info)`: an async generator yielding an `ErrorResponse`, one
  `ChatCompletionResponse` (`n` choices, `usage`), or, when `body.stream`, `ChatCompletionStreamResponse`
  chunks (`serve/chat_protocol.py`);
- `completions(...)`: yields a 404 `ErrorResponse`: the project's models are asked through the chat route
  (its prompt rendering and image rules); a raw-prompt route would bypass them;
- `check_health()`: fails when the engine is closed or one engine call has run longer than
  `serve.engine_hang_s`, so `/readyz` says so and Serve restarts the wedged replica.

What reaches the engine is what the ingress made of the request: the question rendered with the project's
instruction, the system line added, the image padded. The engine shows the model exactly the prompt every
stage shows it (`model.generation.generate_responses`: `format_prompt` with the request's system line, the
same fixed-shape batches, so a greedy answer here is the evaluated one); another architecture is asked
through its own chat template (`HFSampler`, `model.chat_format`). Greedy requests from concurrent users
share one `generate` call (`MicroBatcher`, `serve.max_batch_size`); the engine runs in one worker thread, so
the replica's event loop keeps collecting the next batch meanwhile. `usage` counts the prompt's tokens as
encoded, and each answer's by re-tokenising it as it follows the prompt (the generation returns text), plus
its EOS when it stopped before `max_tokens`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from inbol_ray.config import Config
from inbol_ray.data.images import decode_image
from inbol_ray.runtime import quiet_env
from serve.chat_protocol import (
    Answer,
    Decoding,
    RequestError,
    Turn,
    completion,
    cut_at_stop,
    error_response,
    read_decoding,
    read_turn,
    stream,
)
from serve.replica import bind_replica_grpc_to_node_ip

log = logging.getLogger(__name__)


class MicroBatcher:
    """Gathers concurrent calls into one batch call: dynamic batching that also works outside Serve.

    Why not `serve.batch`: in Ray 2.60 it needs a replica context (it raises outside a replica), and the
    engine class must run in tests and in the benchmark's in-process baseline with the same batching. A
    batch starts when it is full or `wait_s` after its first request; requests arriving while a batch runs
    form the next one, so under load batches fill without waiting.
    """

    def __init__(
        self, fn: Callable[[list[Any]], Awaitable[list[Any]]], max_batch_size: int, wait_s: float
    ) -> None:
        self.fn, self.max_batch_size, self.wait_s = fn, max_batch_size, wait_s
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            if len(self._pending) < self.max_batch_size:
                await asyncio.sleep(self.wait_s)
            batch = self._pending[: self.max_batch_size]
            del self._pending[: self.max_batch_size]
            try:
                results = await self.fn([item for item, _ in batch])
            except Exception as exc:  # the whole batch failed: every caller hears why
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():  # the caller may have gone (cancelled request)
                    future.set_result(result)


@dataclass(frozen=True)
class Job:
    """One request as the engine thread takes it."""

    turn: Turn
    decoding: Decoding

    def key(self) -> tuple:
        """Jobs with one key share a `generate` call: the prompt's system line and the decoding, except
        `n` of a greedy job (one greedy answer serves every choice) and `stop` (cut afterwards)."""
        d = self.decoding
        if d.greedy:
            return (self.turn.system, d.max_tokens)
        return (self.turn.system, d.max_tokens, d.temperature, d.top_p, d.seed, d.n)


class TransformersServer:
    """One checkpoint (a full model, or an adapter merged with its base in memory) on transformers."""

    def __init__(self, checkpoint: str, cfg: Config, base: str | None = None) -> None:
        quiet_env()
        bind_replica_grpc_to_node_ip()  # before Serve starts the replica's gRPC server: loopback stays loopback
        from inbol_ray.sampling.hf_engine import HFSampler

        self.cfg = cfg
        self.checkpoint = checkpoint
        self.sampler: HFSampler | None = HFSampler(
            checkpoint,
            dtype=cfg.model.dtype,
            base=base,
            image_aspect=cfg.model.image_aspect,
            system=cfg.prompt.system,
        )
        set_in_file = self.sampler.model.generation_config.to_diff_dict()
        self.defaults = {k: float(set_in_file[k]) for k in ("temperature", "top_p") if k in set_in_file}
        """What the checkpoint's generation_config.json sets: vLLM's defaults for a request that sets none."""
        # One engine thread: calls run one at a time (the engine is not re-entrant, nor is the tokenizer,
        # and on CPU two concurrent generate calls would only fight over the same cores).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._busy_since: float | None = None
        self._batcher = MicroBatcher(
            self._greedy_batch, cfg.serve.max_batch_size, cfg.serve.batch_wait_timeout_s
        )

    # --- the handle protocol ---
    async def chat(self, body: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        try:
            job = Job(read_turn(body.messages), read_decoding(body, self.cfg.serve.max_tokens, self.defaults))
            self._check_system(job.turn)
            if job.decoding.greedy:
                answer = await self._batcher.submit(job)
            else:
                (answer,) = await self._in_engine(self._answer, [job])
        except RequestError as exc:
            yield error_response(exc.status, exc.message, exc.param)
            return
        except Exception as exc:  # the engine failed this request; the replica keeps serving
            log.exception("engine call failed")
            yield error_response(500, f"engine error ({type(exc).__name__}); the replica keeps serving")
            return
        model = body.model or self.checkpoint
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            for chunk in stream(model, answer, include_usage):
                yield chunk
        else:
            yield completion(model, answer)

    async def completions(self, body: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        yield error_response(
            404, "/v1/completions is not served by the transformers engine: use /v1/chat/completions", "model"
        )

    def check_health(self) -> None:
        """Serve's health hook and `/readyz`'s: a closed or wedged engine fails it (Serve then restarts the
        replica instead of letting it hold requests)."""
        if self.sampler is None:
            raise RuntimeError("the engine is closed")
        since = self._busy_since
        if since is not None and (running := time.monotonic() - since) > self.cfg.serve.engine_hang_s:
            raise RuntimeError(
                f"an engine call has run {running:.0f} s, longer than serve.engine_hang_s "
                f"({self.cfg.serve.engine_hang_s:g} s): the engine is wedged"
            )

    # --- the engine ---
    def _check_system(self, turn: Turn) -> None:
        """Another architecture is asked through its own template without a system line, as every stage asks
        it (`HFSampler`); the ingress' own line (`prompt.system`) is dropped, another is refused."""
        assert self.sampler is not None
        if self.sampler.own_template and turn.system not in (None, "", self.cfg.prompt.system):
            raise RequestError(
                400, "this checkpoint is asked through its own chat template: no system message", "messages"
            )

    async def _greedy_batch(self, jobs: list[Job]) -> list[Answer]:
        return await self._in_engine(self._answer, jobs)

    async def _in_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` on the engine thread, timed from when it starts there (queueing is not hanging)."""

        def timed() -> Any:
            self._busy_since = time.monotonic()
            try:
                return fn(*args)
            finally:
                self._busy_since = None

        return await asyncio.get_running_loop().run_in_executor(self._executor, timed)

    def _answer(self, jobs: list[Job]) -> list[Answer]:
        """Every job's answer (engine thread): one `generate` call per key, then stop strings and usage."""
        if self.sampler is None:
            raise RuntimeError("the engine is closed")
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.key(), []).append(i)
        out: list[Answer | None] = [None] * len(jobs)
        for members in groups.values():
            texts = self._generate([jobs[i] for i in members])
            for i, choices in zip(members, texts, strict=True):
                out[i] = self._finish(jobs[i], choices)
        return out  # type: ignore[return-value]

    def _generate(self, jobs: list[Job]) -> list[list[str]]:
        """The choices of jobs sharing a key: the project's generation, as every stage calls it."""
        assert self.sampler is not None
        from inbol_ray.model.generation import generate_responses

        d, system = jobs[0].decoding, jobs[0].turn.system or ""
        images = [None if j.turn.image is None else decode_image(j.turn.image) for j in jobs]
        prompts = [j.turn.text for j in jobs]
        k = 1 if d.greedy else d.n
        seeds = None if d.seed is None else [d.seed] * len(jobs)
        options = dict(
            k=k, temperature=d.temperature, top_p=d.top_p, max_new_tokens=d.max_tokens, seeds=seeds
        )
        if self.sampler.own_template:
            texts = self.sampler.generate(images, prompts, **options)
        else:
            sampled = not d.greedy
            options.update(do_sample=sampled, temperature=d.temperature if sampled else 1.0,
                           top_p=d.top_p if sampled else 1.0)  # fmt: skip
            texts = generate_responses(
                self.sampler.model, self.sampler.processor, images, prompts,
                image_aspect=self.sampler.image_aspect, system=system, **options,
            )  # fmt: skip
        return [t * d.n if d.greedy else t for t in texts]

    def _finish(self, job: Job, texts: list[str]) -> Answer:
        """Stop strings cut, finish reasons and token counts of one job's choices."""
        cut = [cut_at_stop(t, job.decoding.stop) for t in texts]
        texts = [t for t, _ in cut]
        prompt_tokens, answer_tokens = self._count(job.turn, texts)
        limit = job.decoding.max_tokens
        reasons, counts = [], []
        for (_, stopped), n in zip(cut, answer_tokens, strict=True):
            length = not stopped and n >= limit
            reasons.append("length" if length else "stop")
            counts.append(limit if length else min(n + 1, limit))  # + EOS (or the stop string's first token)
        return Answer(texts, reasons, prompt_tokens, counts)

    def _count(self, turn: Turn, texts: list[str]) -> tuple[int, list[int]]:
        """Tokens of the prompt as the model sees it, and of each answer as it follows the prompt."""
        assert self.sampler is not None
        from inbol_ray.model.batching import encode_prompts, encode_responses
        from inbol_ray.model.chat_format import chat_text

        processor, has_image = self.sampler.processor, turn.image is not None
        tok = processor.tokenizer
        if self.sampler.own_template:
            images = [decode_image(turn.image)] if turn.image is not None else None
            text = chat_text(processor, turn.text, has_image)
            prompt = len(processor(text=[text], images=images)["input_ids"][0])
            answers = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        else:
            system = turn.system or ""
            prompt = len(encode_prompts(processor, [turn.text], [has_image], system)[0])
            answers = encode_responses(tok, texts, [turn.text] * len(texts), [has_image] * len(texts),
                                       add_eos=False, system=system)  # fmt: skip
        return prompt, [len(ids or []) if t else 0 for t, ids in zip(texts, answers, strict=True)]

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        self._executor.shutdown(wait=False)

    def __del__(self) -> None:  # Serve calls this when a replica stops (downscaling, redeploy)
        if hasattr(self, "_executor"):
            self.close()
