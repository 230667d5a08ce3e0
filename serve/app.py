"""The Ray Serve application: an autoscaled refusal-aware model deployment behind one HTTP + Gradio ingress.

    serve run serve.app:build_app checkpoint=runs/tiny/models/cadpo config=configs/tiny.yaml
    python -m serve --checkpoint runs/tiny/models/cadpo            # the same, on 127.0.0.1:8000

Two deployments, because they scale differently:
- `RefusalAwareModel` holds the model (a `Sampler`: vLLM on a GPU, transformers on CPU) and autoscales on
  ongoing requests between `serve.min_replicas` and `serve.max_replicas`. Greedy requests are batched
  (`serve.batch`), so concurrent users share one `generate` call; the engine runs in one worker thread,
  so the replica's event loop keeps collecting the next batch meanwhile.
- `Ingress` is a single replica: the FastAPI routes of `serve/api.py` (parsing and bad input never reach
  the model) and the Gradio demo mounted at /demo. `ray.serve.gradio_integrations.GradioServer` does not
  work with gradio 6 (HTTP 500, the queue never starts); `gr.mount_gradio_app` on the ingress' FastAPI
  app does, and the demo calls the model through the same `DeploymentHandle` as the API.

`RefusalAwareModel` is a plain class wrapped by `serve.deployment`, so tests and the benchmark use it
in-process without Ray. `trust_remote_code` is never enabled: a checkpoint is data, not code.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from inbol_ray.config import Config, ServeConfig, load_config
from inbol_ray.data.images import decode_image
from inbol_ray.grading import normalize_answer
from inbol_ray.refusal import is_refusal
from inbol_ray.runtime import quiet_env
from inbol_ray.sampling import Sampler, build_sampler
from serve.api import DEMO_PATH, ApiError, Limits, build_http_app

DEPLOYMENT_NAME = "RefusalAwareModel"
"""Name the RayService manifest (cluster/rayservice.yaml) and serve_config.yaml override settings by."""
INGRESS_NAME = "Ingress"
APP_NAME = "inbol"
BUILD_ARGS = ("checkpoint", "config", "base", "engine", "overrides")
ENGINES = ("auto", "transformers", "vllm")


# --- checkpoints and engines -------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path, base: str | Path | None = None) -> tuple[Path, Path | None]:
    """(model dir, adapter dir or None) for a merged HF checkpoint, a peft adapter, or a training output.

    A training output holds both a merged model (config.json) and `adapter/`: the merged one wins, it
    loads without peft. A bare adapter names its base in adapter_config.json; `base` overrides that (an
    adapter trained elsewhere records a path that does not exist here).
    """
    p = Path(path)
    if (p / "config.json").is_file():
        return p, None
    adapter = next((d for d in (p, p / "adapter") if (d / "adapter_config.json").is_file()), None)
    if adapter is None:
        raise FileNotFoundError(f"{p}: neither a HF model dir (config.json) nor a peft adapter dir")
    base_dir = Path(
        base or json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"adapter {adapter}: base model {base_dir} not found; pass its path as `base`"
        )
    return base_dir, adapter


def merge_adapter(base_dir: Path, adapter_dir: Path, dtype: str, out_dir: Path) -> Path:
    """Base + peft adapter merged into one HF dir, the form both engines load (vLLM needs a directory)."""
    import torch
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from inbol_ray.checkpoint import to_llava_hf_layout

    model = LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(base_dir).save_pretrained(out_dir)
    to_llava_hf_layout(out_dir)
    return out_dir


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


def answer_agreement(greedy: str, samples: list[str]) -> float:
    """Share of sampled answers that agree with the greedy one: the live confidence estimate.

    Answers agree when their VQA-normalised text is equal ("Two." = "2"); two refusals agree whatever
    their wording, so a confident refusal scores high too.
    """
    if not samples:
        return 0.0
    if is_refusal(greedy):
        return sum(is_refusal(s) for s in samples) / len(samples)
    target = normalize_answer(greedy)
    return sum(not is_refusal(s) and normalize_answer(s) == target for s in samples) / len(samples)


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
        self.checkpoint = str(checkpoint)
        model_dir, adapter = resolve_checkpoint(checkpoint, base)
        self._merged_dir: Path | None = None
        if adapter is not None:
            self._merged_dir = Path(tempfile.mkdtemp(prefix="inbol-merged-"))
            model_dir = merge_adapter(model_dir, adapter, cfg.model.dtype, self._merged_dir)
        gpu = torch.cuda.is_available()
        try:
            import vllm  # noqa: F401

            vllm_installed = True
        except ImportError:
            vllm_installed = False
        self.engine = choose_engine(engine, gpu, vllm_installed)
        self.sampler: Sampler | None = build_sampler(
            self.engine, str(model_dir), cfg.sampling, cfg.model.dtype
        )
        self.adapter = str(adapter) if adapter else None
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
            return {"answer": greedy, "refused": is_refusal(greedy)}
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
            "refused": is_refusal(greedy),
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
        return {"answer": text, "refused": is_refusal(text)}

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
                questions,
                k=k,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=tokens,
                instruction=self.cfg.eval.answer_instruction or None,
            )

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        self._executor.shutdown(wait=False)
        if self._merged_dir is not None:
            shutil.rmtree(self._merged_dir, ignore_errors=True)
            self._merged_dir = None

    def __del__(self) -> None:  # Serve calls this when a replica stops (downscaling, redeploy)
        if hasattr(self, "_executor"):
            self.close()


# --- the ingress -------------------------------------------------------------------------------------


class HandleClient:
    """The `ModelClient` of the routes and the demo, over a `DeploymentHandle` to the model."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def answer(self, image: bytes, question: str, mode: str) -> dict[str, Any]:
        return await self._call(self.handle.answer.remote(image, question, mode))

    async def complete(
        self, image: bytes, question: str, temperature: float, top_p: float, max_new_tokens: int | None
    ) -> dict[str, Any]:
        return await self._call(
            self.handle.complete.remote(image, question, temperature, top_p, max_new_tokens)
        )

    async def info(self) -> dict[str, Any]:
        return await self._call(self.handle.info.remote())

    @staticmethod
    async def _call(response: Any) -> dict[str, Any]:
        try:
            return await response
        except BackPressureError:
            raise ApiError(503, "all model replicas are busy; retry shortly") from None


class Ingress:
    """Single replica serving the API routes and the Gradio demo; built at replica start by Serve."""

    def __init__(self, model: DeploymentHandle, cfg: Config, model_name: str) -> None:
        quiet_env()
        bind_replica_grpc_to_node_ip()
        self.client = HandleClient(model)
        self.cfg = cfg
        self.model_name = model_name

    def __serve_build_asgi_app__(self) -> Any:
        from serve.gradio_demo import mount_demo

        limits = Limits.from_config(self.cfg)
        app = build_http_app(self.client, limits, self.model_name)
        return mount_demo(app, self.client, limits, self.cfg, self.model_name, path=DEMO_PATH)


ModelDeployment = serve.deployment(RefusalAwareModel, name=DEPLOYMENT_NAME)
IngressDeployment = serve.deployment(serve.ingress()(Ingress), name=INGRESS_NAME, num_replicas=1)


def autoscaling_config(s: ServeConfig) -> dict[str, Any]:
    return {
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "target_ongoing_requests": s.target_ongoing_requests,
        "upscale_delay_s": s.upscale_delay_s,
    }


def ingress_capacity(s: ServeConfig) -> int:
    """Requests the one ingress replica holds at once: every model slot twice over (one running, one
    waiting), so the ingress never becomes the bottleneck the autoscaler cannot see past; Gradio's
    event streams and health checks fit in the second half."""
    return 2 * s.max_replicas * s.max_ongoing_requests


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (`import_path: serve.app:build_app`).

    args: `checkpoint` (else env INBOL_CHECKPOINT), `config` (YAML; defaults otherwise), `base` (base
    model of an adapter), `engine` (auto | transformers | vllm), `overrides` (dotted config overrides).
    """
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise ValueError(f"unknown build_app args {unknown}; expected {', '.join(BUILD_ARGS)}")
    checkpoint = args.get("checkpoint") or os.environ.get("INBOL_CHECKPOINT")
    if not checkpoint:
        raise ValueError("no checkpoint: pass args.checkpoint or set INBOL_CHECKPOINT")
    cfg = load_config(args.get("config"), list(args.get("overrides") or []))
    checkpoint = str(Path(checkpoint).resolve())
    base = str(Path(args["base"]).resolve()) if args.get("base") else None
    engine = args.get("engine", "auto")
    choose_engine(engine, gpu=False, vllm_installed=False)  # reject a bad name here, not in a replica
    resolve_checkpoint(checkpoint, base)  # fail the deploy on a missing checkpoint, not every replica
    model = ModelDeployment.options(
        autoscaling_config=autoscaling_config(cfg.serve),
        max_ongoing_requests=cfg.serve.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.sampling.cpus_per_actor, "num_gpus": cfg.sampling.gpus_per_actor},
    ).bind(checkpoint, cfg, base, engine)
    return IngressDeployment.options(
        max_ongoing_requests=ingress_capacity(cfg.serve), ray_actor_options={"num_cpus": 0}
    ).bind(model, cfg, Path(checkpoint).name)
