"""The refusal-aware OpenAI ingress: Ray's `OpenAiIngress` plus what is ours (see `serve/llm_app.py`).

Ray provides the protocol: request and response models, streaming, usage, `n`, stop, temperature/top_p/
max_tokens, multi-LoRA routing by model id. This subclass adds, thinly:
- model names: a run's methods by name (`cadpo`), routed to Ray's ids (`base:cadpo` for an adapter on the
  base deployment, the method itself for a full checkpoint); `/v1/models` lists their names only (no
  storage locations or deployment internals);
- the project's prompt: the last user turn of a chat is rendered by `render_prompt` (the short-answer
  instruction, as sampled, trained and evaluated), unless the request says `"render": false`;
- input rules, one set for every message, part and route (`serve/chat_rules.py`): text and `data:` URL
  image parts only, at most one image, decodable and within the configured size, `n` and `max_tokens`
  capped; a bad request is refused before it reaches a replica. `/v1/completions` is closed (404): a raw
  prompt would skip the project's prompt and image rules, and no client of the project sends one;
- images shaped as every other stage shapes them (`model.image_aspect` pad: padded to a square here,
  since vLLM's server would centre-crop them), decoded off the event loop, a few at a time;
- guards in front of every route (`guard`): the key (`serve/auth.py`), CORS only for
  `serve.cors_origins` (Ray's allow-every-origin CORS removed), the body size counted as it streams in,
  a bound on the model requests held at once (503 + Retry-After) and a timeout on each (504);
- `refused` on every choice (the project's detector; on the last streamed chunk of a choice), and, with
  `"confidence": true` and `n` = K >= 2, a `confidence` object: the majority answer, the share of the K
  samples agreeing with it, whether it is a refusal, and the samples;
- OpenAI's error shape `{"error": {message, type, param, code}}` for every 4xx/5xx, including the 404s
  Ray and FastAPI answer as `{"detail": ...}`;
- `/v1/answer` (image + question -> answer, refused, confidence), `/healthz`, `/readyz` (every served
  model answers a health check), and the Gradio demo at `/demo` (mounted by `__serve_build_asgi_app__`).
The request and response rules themselves are `serve/chat_rules.py` (pure, tested without Ray).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inbol_ray.boundary.agreement import answer_agreement
from inbol_ray.config import Config, ServeConfig
from inbol_ray.model.prompt import chat_user_message
from inbol_ray.refusal import is_refusal
from serve.api import (
    DEMO_PATH,
    READY_TIMEOUT_S,
    Admission,
    ApiError,
    BodyLimit,
    Limits,
    error_body,
    parse_answer_request,
    read_body,
)
from serve.auth import KeyAuth, api_key
from serve.chat_rules import (
    annotate,
    annotate_stream,
    chat_request,
    check_chat_body,
    choice_text,
    last_user_text,
    pad_chat_images,
    prepare_chat_images,
    render_last_user_turn,
    with_bos,
    with_system_line,
)
from serve.ray_llm import ChatCompletionRequest, ModelCard, OpenAIHTTPException, OpenAiIngress, init
from serve.replica import bind_replica_grpc_to_node_ip

T = TypeVar("T")
OWNER = "inbol-ray"
MODEL_ROUTES = frozenset({"/v1/chat/completions", "/v1/answer"})
"""The routes that hold an engine: bounded and timed by `Admission`."""
IMAGE_WORKERS = 4
"""Images decoded at once, off the event loop: a 25-Mpixel image is ~75 MB of RGB, so a few at a time bound
the ingress' memory, and the loop keeps answering health checks, the demo and token streams meanwhile."""


def admission_limit(s: ServeConfig) -> int:
    """Model requests the ingress holds at once: a replica's worth running (`max_ongoing_requests`) and
    `max_queued_requests` waiting; one more is answered 503 rather than queued without bound."""
    return s.max_ongoing_requests + s.max_queued_requests


def guard(app: FastAPI, s: ServeConfig, limits: Limits, key: str | None) -> FastAPI:
    """The guards in front of every route, outermost first: CORS (only `serve.cors_origins`, no
    credentials: the key is a header a page must hold itself, never an ambient cookie), the key
    (`KeyAuth`, when one is set), the body size (`BodyLimit`), the model routes' admission and timeout.

    Ray's `init()` adds `CORSMiddleware(allow_origins=["*"], allow_credentials=True)`: any page open in an
    operator's browser could call a loopback server and read its answers. It is taken out of
    `user_middleware` here, before the app starts (Starlette builds its middleware stack on the first
    request). A CORS middleware stays even with no origins: Gradio adds its own permissive CORS headers to the
    demo unless the parent app configures CORS."""
    app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    app.add_middleware(Admission, paths=MODEL_ROUTES, limit=admission_limit(s), timeout_s=s.request_timeout_s)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if key:
        app.add_middleware(KeyAuth, key=key, demo_path=DEMO_PATH)
    app.add_middleware(CORSMiddleware, allow_origins=list(s.cors_origins), allow_credentials=False,
                       allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"])  # fmt: skip
    return app


@dataclass(frozen=True)
class ServedModel:
    """One name a client can ask for, and how it is served."""

    name: str
    """What clients send as `model` (`base`, `sft`, `cadpo`, ...)."""
    route: str
    """Ray's model id: the deployment's (`base`) or, for an adapter, `<deployment>:<name>`."""
    deployment: str
    """Model id of the deployment that serves it."""
    checkpoint: str
    """Where its weights are (the adapter folder for an adapter, else the model folder)."""

    @property
    def adapter(self) -> bool:
        return self.route != self.deployment


# --- the ingress ------------------------------------------------------------------------------------------


class RefusalAwareIngress(OpenAiIngress):
    """`OpenAiIngress` with the run's model names, the project's prompt, refusal flags and OpenAI errors."""

    def __init__(
        self,
        llm_deployments: dict[str, Any],
        model_cards: dict[str, ModelCard],
        *,
        served: Sequence[ServedModel],
        cfg: Config,
        lora_paths: dict[str, str] | None = None,
        background: tuple[int, int, int] | None = None,
    ) -> None:
        bind_replica_grpc_to_node_ip()
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self.served = {m.name: m for m in served}
        self.routes = {m.route: m for m in served}
        self.cfg = cfg
        self.limits = Limits.from_config(cfg)
        self.background = background
        """The pad colour of images (`model.image_aspect` pad, the base's processor); None: sent as is."""
        self.key = api_key(cfg.serve.api_key_env)
        """Read here, in the replica, from its environment: never a build argument or a config value."""
        self.started = int(time.time())
        self._image_slots = asyncio.Semaphore(IMAGE_WORKERS)

    async def image_work(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` (image decoding, padding) in a thread, at most `IMAGE_WORKERS` at once."""
        async with self._image_slots:
            return await asyncio.to_thread(fn, *args)

    # --- models ---
    async def _get_model_id(self, model: str | None) -> str:
        if model is None:
            if len(self.served) == 1:
                return next(iter(self.served.values())).route
            raise OpenAIHTTPException(
                400, f"field 'model' is required; served: {', '.join(self.served)}", "invalid_request_error"
            )
        found = self.served.get(model) or self.routes.get(model)
        if found is None:
            raise OpenAIHTTPException(
                404, f"model '{model}' is not served; served: {', '.join(self.served)}", "model_not_found"
            )
        return found.route

    def _card(self, m: ServedModel) -> dict[str, Any]:
        """A served name as OpenAI lists a model: no checkpoint location, route or deployment (a client
        needs the name; where the weights live is the operator's business)."""
        return {"id": m.name, "object": "model", "created": self.started, "owned_by": OWNER}

    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._card(m) for m in self.served.values()]})

    async def model_data(self, model: str) -> JSONResponse:
        found = self.served.get(model) or self.routes.get(model)
        if found is None:
            raise ApiError(404, f"model '{model}' is not served; served: {', '.join(self.served)}", "model")
        return JSONResponse(self._card(found))

    # --- OpenAI routes ---
    async def chat(self, request: Request) -> Response:
        """The rules run on the JSON the client sent (`check_chat_body`), before a request model is built:
        vLLM's model would accept, and reshape, parts the rules refuse."""
        body = check_chat_body(await read_body(request, self.limits), self.limits)
        confidence = bool(body.pop("confidence", False))
        render = body.pop("render", True)
        messages = body["messages"]
        await self.image_work(prepare_chat_images, messages, self.limits, self.background)
        question = last_user_text(messages)
        if render:
            render_last_user_turn(messages, self.cfg)
            with_system_line(messages, self.cfg.prompt.system)
        request_model = chat_request(body)
        request_model.messages = messages
        with_bos(request_model)
        request_model.model = await self._get_model_id(request_model.model)
        response = await self._process_llm_request(request_model, call_method="chat", raw_request=request)
        return self._annotated(response, question, confidence)

    async def completions(self, request: Request) -> Response:
        """Closed: a raw prompt skips the project's prompt, BOS and image rules, no client of the project
        sends one, and a backend without a completions protocol (transformers) could not serve it."""
        raise ApiError(404, "/v1/completions is not served: use /v1/chat/completions", "prompt")

    @staticmethod
    def _annotated(response: Response, question: str | None, confidence: bool) -> Response:
        if isinstance(response, StreamingResponse):
            return StreamingResponse(
                annotate_stream(response.body_iterator, question), media_type="text/event-stream"
            )
        if response.status_code >= 400:
            return response
        return JSONResponse(annotate(json.loads(response.body), question, confidence))

    # --- the simple API ---
    async def answer(self, request: Request) -> JSONResponse:
        """`POST /v1/answer {image, question, mode?, model?}` -> `{answer, refused, model, latency_ms}`, plus
        `confidence` and `samples` in mode `confidence` (K = serve.confidence_k at sampling temperature)."""
        start = time.perf_counter()
        raw = await read_body(request, self.limits)
        model = raw.pop("model", None)
        if model is not None and not isinstance(model, str):
            raise ApiError(422, "field 'model' must be a string", "model")
        req = await self.image_work(parse_answer_request, raw, self.limits)
        result = await self.ask(req.image, req.question, req.mode, model)
        return JSONResponse({**result, "latency_ms": round((time.perf_counter() - start) * 1000, 2)})

    async def ask(
        self, image: bytes, question: str, mode: str = "answer", model: str | None = None
    ) -> dict[str, Any]:
        """One image + question through the chat route: the greedy answer, and K samples in confidence mode."""
        messages = [chat_user_message(question, image)]
        await self.image_work(pad_chat_images, messages, self.limits, self.background)  # once for all calls
        name = model or ("cadpo" if "cadpo" in self.served else next(iter(self.served)))
        tokens = self.cfg.eval.max_new_tokens
        greedy = self._complete(name, messages, n=1, temperature=0.0, max_tokens=tokens)
        calls = [greedy]
        if mode == "confidence":
            s = self.cfg.sampling
            calls.append(self._complete(name, messages, n=self.cfg.serve.confidence_k, temperature=s.temperature,
                                        top_p=s.top_p, max_tokens=s.max_new_tokens))  # fmt: skip
        results = await asyncio.gather(*calls)
        answer = results[0][0]
        out: dict[str, Any] = {
            "answer": answer,
            "refused": is_refusal(answer, question=question),
            "model": name,
        }
        if mode == "confidence":
            out.update(confidence=answer_agreement(answer, results[1]), samples=results[1])
        return out

    async def _complete(self, model: str, messages: list[dict[str, Any]], **params: Any) -> list[str]:
        body = ChatCompletionRequest(model=model, messages=messages, **params)
        body.messages = [dict(m) for m in messages]
        render_last_user_turn(body.messages, self.cfg)
        with_system_line(body.messages, self.cfg.prompt.system)
        with_bos(body)
        body.model = await self._get_model_id(model)
        response = await self._process_llm_request(body, call_method="chat", raw_request=None)
        if response.status_code >= 400:
            detail = json.loads(response.body).get("error", {}).get("message", "model error")
            raise ApiError(response.status_code, detail)
        return [choice_text(c) for c in json.loads(response.body)["choices"]]

    # --- health ---
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    async def readyz(self) -> JSONResponse:
        """Ready when every deployment passes its health check and every adapter's files are where they were."""
        report: dict[str, str] = {}

        async def check(name: str, handle: Any) -> None:
            try:
                await asyncio.wait_for(handle.check_health.remote(), READY_TIMEOUT_S)
                report[name] = "ready"
            except Exception as exc:
                report[name] = f"not ready: {type(exc).__name__}: {exc}"

        await asyncio.gather(*(check(n, h) for n, h in self._default_serve_handles.items()))
        models = {m.name: report.get(m.deployment, "not ready: no deployment") for m in self.served.values()}
        ready = all(v == "ready" for v in models.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "models": models}, status_code=200 if ready else 503
        )

    # --- the app ---
    def __serve_build_asgi_app__(self) -> FastAPI:
        """The FastAPI app at replica start: Ray's middleware, OpenAI routes bound to this replica, ours,
        errors in OpenAI's shape, the demo, and the guards in front of them all (`guard`)."""
        app = init()

        @app.exception_handler(ApiError)
        async def api_error(_: Request, exc: ApiError) -> JSONResponse:
            return JSONResponse(exc.body(), status_code=exc.status)

        @app.exception_handler(OpenAIHTTPException)
        async def openai_error(_: Request, exc: OpenAIHTTPException) -> JSONResponse:
            return JSONResponse(
                error_body(exc.status_code, exc.message, kind=exc.type), status_code=exc.status_code
            )

        @app.exception_handler(StarletteHTTPException)
        async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
            return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

        app.get("/v1/models")(self.models)
        app.get("/v1/models/{model:path}")(self.model_data)
        app.post("/v1/chat/completions")(self.chat)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/answer")(self.answer)
        app.get("/healthz")(self.healthz)
        app.get("/readyz")(self.readyz)

        @app.get("/", include_in_schema=False)
        async def root() -> RedirectResponse:
            return RedirectResponse(DEMO_PATH + "/")

        from serve.compare_demo import mount_compare_demo

        mount_compare_demo(app, self, self.limits, self.cfg, path=DEMO_PATH)
        return guard(app, self.cfg.serve, self.limits, self.key)
