"""The refusal-aware OpenAI ingress: Ray's `OpenAiIngress` plus what is ours (see `serve/llm_app.py`).

Ray provides the protocol: request and response models, streaming, usage, `n`, stop, temperature/top_p/
max_tokens, multi-LoRA routing by model id. This subclass adds, thinly:
- model names: a run's methods by name (`cadpo`), routed to Ray's ids (`base:cadpo` for an adapter on the
  base deployment, the method itself for a full checkpoint); `/v1/models` lists them;
- the project's prompt: the last user turn of a chat is rendered by `render_prompt` (the short-answer
  instruction, as sampled, trained and evaluated), unless the request says `"render": false`;
- input rules: at most one image (LLaVA-1.5 sees one), only `data:` URLs (the server fetches nothing),
  decodable and within the configured size; a bad request is refused before it reaches a replica;
- images shaped as every other stage shapes them (`model.image_aspect` pad: padded to a square here,
  since vLLM's server would centre-crop them);
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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIHTTPException,
)
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, init
from starlette.exceptions import HTTPException as StarletteHTTPException

from inbol_ray.boundary.agreement import answer_agreement
from inbol_ray.config import Config
from inbol_ray.model.prompt import chat_user_message
from inbol_ray.refusal import is_refusal
from serve.api import (
    DEMO_PATH,
    READY_TIMEOUT_S,
    ApiError,
    Limits,
    error_body,
    parse_answer_request,
    read_body,
)
from serve.chat_rules import (
    annotate,
    annotate_stream,
    check_chat_images,
    choice_text,
    last_user_text,
    pad_chat_images,
    render_last_user_turn,
    with_bos,
    with_system_line,
)
from serve.model import bind_replica_grpc_to_node_ip

OWNER = "inbol-ray"


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

    def _card(self, m: ServedModel) -> ModelCard:
        return ModelCard(
            id=m.name,
            object="model",
            owned_by=OWNER,
            permission=[],
            metadata={
                "route": m.route,
                "adapter": m.adapter,
                "deployment": m.deployment,
                "checkpoint": m.checkpoint,
            },
        )

    async def models(self) -> ModelList:
        return ModelList(data=[self._card(m) for m in self.served.values()])

    async def model(self, model_id: str) -> ModelCard | None:
        found = self.served.get(model_id) or self.routes.get(model_id)
        return None if found is None else self._card(found)

    # --- OpenAI routes ---
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        extra = body.model_extra or {}
        confidence = bool(extra.get("confidence"))
        messages = list(body.messages)
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                messages[i] = message.model_dump()
            elif not isinstance(message.get("content"), str | None):
                messages[i] = {**message, "content": list(message["content"])}
        check_chat_images(messages, self.limits)
        pad_chat_images(messages, self.limits, self.background)
        question = last_user_text(messages)
        if extra.get("render", True):
            render_last_user_turn(messages, self.cfg)
            with_system_line(messages, self.cfg.prompt.system)
        if confidence and (body.n or 1) < 2:
            raise ApiError(422, "confidence needs n >= 2 samples (set n to K)", "n")
        if confidence and body.stream:
            raise ApiError(422, "confidence mode does not stream (it reads all K samples at once)", "stream")
        body.messages = messages
        with_bos(body)
        body.model = await self._get_model_id(body.model)
        response = await self._process_llm_request(body, call_method="chat", raw_request=request)
        return self._annotated(response, question, confidence)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        body.model = await self._get_model_id(body.model)
        response = await self._process_llm_request(body, call_method="completions", raw_request=request)
        return self._annotated(response, None, False)

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
        req = parse_answer_request(raw, self.limits)
        result = await self.ask(req.image, req.question, req.mode, model)
        return JSONResponse({**result, "latency_ms": round((time.perf_counter() - start) * 1000, 2)})

    async def ask(
        self, image: bytes, question: str, mode: str = "answer", model: str | None = None
    ) -> dict[str, Any]:
        """One image + question through the chat route: the greedy answer, and K samples in confidence mode."""
        messages = [chat_user_message(question, image)]
        pad_chat_images(messages, self.limits, self.background)  # once for the greedy and the K samples
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
        errors in OpenAI's shape, and the demo."""
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

        app.get("/v1/models", response_model=ModelList)(self.models)
        app.get("/v1/models/{model:path}", response_model=ModelCard)(self.model_data)
        app.post("/v1/chat/completions")(self.chat)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/answer")(self.answer)
        app.get("/healthz")(self.healthz)
        app.get("/readyz")(self.readyz)

        @app.get("/", include_in_schema=False)
        async def root() -> RedirectResponse:
            return RedirectResponse(DEMO_PATH + "/")

        from serve.compare_demo import mount_compare_demo

        return mount_compare_demo(app, self, self.limits, self.cfg, path=DEMO_PATH)
