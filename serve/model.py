"""The model deployment: a refusal-aware model behind a micro-batcher, as a plain class Serve wraps.

`RefusalAwareModel` holds the model (a `Sampler`: vLLM on a GPU, transformers on CPU). Greedy requests
are batched (`MicroBatcher`, sized by `serve.max_batch_size`), so concurrent users share one `generate`
call; the engine runs in one worker thread, so the replica's event loop keeps collecting the next batch
meanwhile. In confidence mode it also samples K answers and reports their agreement with the greedy one
(`inbol_ray.boundary.agreement`).

Why apart from `serve/app.py`: nothing here needs a running Serve, so tests and the benchmark use the
class in-process; `serve/app.py` wraps it with `serve.deployment` and builds the ingress around it.
Checkpoints are resolved and copied from object storage by `inbol_ray.checkpoint`; an adapter is applied
to its base by the engine (in memory, or as a vLLM LoRARequest);
`trust_remote_code` is never enabled: a checkpoint is data, not code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from inbol_ray import checkpoint as ckpt
from inbol_ray.boundary.agreement import answer_agreement
from inbol_ray.config import Config
from inbol_ray.data.images import decode_image
from inbol_ray.model.prompt import render_prompt
from inbol_ray.refusal import is_refusal
from inbol_ray.runtime import quiet_env
from inbol_ray.sampling import Sampler, build_sampler

ENGINES = ("auto", "transformers", "vllm")


def choose_engine(requested: str, gpu: bool, vllm_installed: bool) -> str:
    """`auto`: vLLM on a GPU when installed, transformers otherwise (the CPU path); explicit names win."""
    if requested not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {requested!r}")
    if requested != "auto":
        return requested
    return "vllm" if gpu and vllm_installed else "transformers"


def bind_replica_grpc_to_node_ip() -> None:
    """Keep this replica's internal gRPC server off public interfaces (call in a deployment constructor).

    Ray 2.60 starts an inter-deployment gRPC server in every replica on `[::]:0`, i.e. on every interface,
    whether or not gRPC transport is in use (handles use Ray actor calls unless
    RAY_SERVE_USE_GRPC_BY_DEFAULT=1), and has no setting for its host. We bind it to this node's Ray IP
    instead: 127.0.0.1 on a loopback Ray, the node's cluster address on a cluster, where other nodes still
    reach it. The constructor runs in the replica process before that server starts; outside a replica,
    or if Ray's internals move, this does nothing.
    """
    try:
        serve.get_replica_context()
        from ray.serve._private import replica
    except Exception:  # not in a replica (tests, benchmark) or a Ray without this module
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "inbol_bound", False):
        return
    import ray

    host = ray.util.get_node_ip_address()
    host = f"[{host}]" if ":" in host else host

    def bound(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = f"{host}:{address.removeprefix('[::]:')}"
        return original(server, address)

    bound.inbol_bound = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bound


# --- the model deployment ----------------------------------------------------------------------------


class MicroBatcher:
    """Gathers concurrent calls into one batch call: dynamic batching that also works outside Serve.

    Why not `serve.batch`: in Ray 2.60 it needs a replica context (it raises outside a replica), and
    the plain model class must run in tests and in the benchmark's in-process baseline with the same
    batching. A batch starts when it is full or `wait_s` after its first request; requests arriving
    while a batch runs form the next one, so under load batches fill without waiting.
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


class RefusalAwareModel:
    """Answers (image bytes, question); in confidence mode also samples K answers to estimate confidence."""

    def __init__(self, checkpoint: str, cfg: Config, base: str | None = None, engine: str = "auto") -> None:
        import torch

        quiet_env()
        bind_replica_grpc_to_node_ip()
        self.cfg = cfg
        self.checkpoint = checkpoint
        found = ckpt.resolve(checkpoint, base)
        gpu = torch.cuda.is_available()
        try:
            import vllm  # noqa: F401

            vllm_installed = True
        except ImportError:
            vllm_installed = False
        self.engine = choose_engine(engine, gpu, vllm_installed)
        # The engine loads the checkpoint itself: copied from object storage to a node-local cache, and an
        # adapter applied to its base (merged in memory by transformers, a LoRARequest in vLLM).
        self.sampler: Sampler | None = build_sampler(
            self.engine,
            checkpoint,
            cfg.sampling,
            cfg.model.dtype,
            base,
            image_aspect=cfg.model.image_aspect,
            system=cfg.prompt.system,
        )
        self.adapter = found.adapter_dir
        # One engine thread: calls run one at a time (the engines are not re-entrant, and on CPU two
        # concurrent generate calls would only fight over the same cores).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._batcher = MicroBatcher(
            self._greedy_batch, cfg.serve.max_batch_size, cfg.serve.batch_wait_timeout_s
        )

    async def answer(self, image: bytes, question: str, mode: str = "answer") -> dict[str, Any]:
        """`{answer, refused}`, plus `confidence` and `samples` when `mode == "confidence"`."""
        if mode not in ("answer", "confidence"):
            raise ValueError(f"mode must be answer or confidence, got {mode!r}")
        if mode == "answer":
            greedy = await self._greedy(image, question)
            return {"answer": greedy, "refused": is_refusal(greedy, question=question)}
        s = self.cfg.sampling
        greedy, samples = await asyncio.gather(
            self._greedy(image, question),
            self._generate(
                [image], [question], self.cfg.serve.confidence_k, s.temperature, s.top_p, s.max_new_tokens
            ),
        )
        samples = samples[0]
        return {
            "answer": greedy,
            "refused": is_refusal(greedy, question=question),
            "confidence": answer_agreement(greedy, samples),
            "samples": samples,
        }

    async def complete(
        self, image: bytes, question: str, temperature: float, top_p: float, max_new_tokens: int | None
    ) -> dict[str, Any]:
        """One answer with the client's decoding settings (OpenAI route); greedy ones join the batch.

        `max_new_tokens` is capped at `eval.max_new_tokens`: answers are a word or phrase, and an
        uncapped client value would let one request hold the replica for thousands of tokens.
        """
        cap = self.cfg.eval.max_new_tokens
        tokens = min(max_new_tokens or cap, cap)
        if temperature == 0 and tokens == cap:
            text = await self._greedy(image, question)
        else:
            text = (await self._generate([image], [question], 1, temperature, top_p, tokens))[0][0]
        return {"answer": text, "refused": is_refusal(text, question=question)}

    async def info(self) -> dict[str, Any]:
        """What `/readyz` reports: the replica is up and which model and engine it serves."""
        self.check_health()
        return {"checkpoint": self.checkpoint, "adapter": self.adapter, "engine": self.engine}

    def check_health(self) -> None:
        """Serve's health hook: a replica whose engine is gone is restarted instead of failing requests."""
        if self.sampler is None:
            raise RuntimeError("model is closed")

    async def _greedy(self, image: bytes, question: str) -> str:
        return await self._batcher.submit((image, question))

    async def _greedy_batch(self, requests: list[tuple[bytes, str]]) -> list[str]:
        """Greedy answers for a batch of concurrent requests in one engine call."""
        images, questions = [r[0] for r in requests], [r[1] for r in requests]
        out = await self._generate(images, questions, 1, 0.0, 1.0, self.cfg.eval.max_new_tokens)
        return [r[0] for r in out]

    async def _generate(
        self, images: list[bytes], questions: list[str], k: int, temperature: float, top_p: float, tokens: int
    ) -> list[list[str]]:
        def run() -> list[list[str]]:
            if self.sampler is None:
                raise RuntimeError("model is closed")
            return self.sampler.generate(
                [decode_image(b) for b in images],
                [render_prompt(q, None, self.cfg.prompt) for q in questions],  # as sampled and evaluated
                k=k,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=tokens,
            )

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        self._executor.shutdown(wait=False)

    def __del__(self) -> None:  # Serve calls this when a replica stops (downscaling, redeploy)
        if hasattr(self, "_executor"):
            self.close()
