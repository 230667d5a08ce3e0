"""The Ray Serve application: an autoscaled refusal-aware model deployment behind one HTTP + Gradio ingress.

    serve run serve.app:build_app checkpoint=runs/tiny/models/cadpo config=configs/tiny.yaml
    python -m serve --checkpoint runs/tiny/models/cadpo            # the same, on 127.0.0.1:8000

Two deployments, because they scale differently:
- `RefusalAwareModel` (`serve/model.py`) holds the model and autoscales on ongoing requests between
  `serve.min_replicas` and `serve.max_replicas`.
- `Ingress` is a single replica: the FastAPI routes of `serve/api.py` (parsing and bad input never reach
  the model) and the Gradio demo mounted at /demo. `ray.serve.gradio_integrations.GradioServer` does not
  work with gradio 6 (HTTP 500, the queue never starts); `gr.mount_gradio_app` on the ingress' FastAPI
  app does, and the demo calls the model through the same `DeploymentHandle` as the API.

A checkpoint is any location `inbol_ray.checkpoint.resolve` understands (a merged HF dir, a training
output, a peft adapter), as a local path or an object-store URI.
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from inbol_ray import checkpoint as ckpt
from inbol_ray.config import Config, ServeConfig, load_config
from inbol_ray.data import io as dio
from inbol_ray.generation.stage import actor_options
from inbol_ray.run_layout import RunLayout
from inbol_ray.runtime import quiet_env
from serve.api import DEMO_PATH, ApiError, Limits, build_http_app
from serve.model import RefusalAwareModel, bind_replica_grpc_to_node_ip, choose_engine

DEPLOYMENT_NAME = "RefusalAwareModel"
"""Name the RayService manifest (cluster/rayservice.yaml) and serve_config.yaml override settings by."""
INGRESS_NAME = "Ingress"
APP_NAME = "inbol"
BUILD_ARGS = ("checkpoint", "method", "config", "base", "engine", "overrides")


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


def model_name(checkpoint: str) -> str:
    """The name `/v1/models` reports: the checkpoint's last path component (`runs/x/models/cadpo` -> cadpo)."""
    return checkpoint.rstrip("/").rsplit("/", 1)[-1]


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (`import_path: serve.app:build_app`).

    args: `checkpoint` (else env INBOL_CHECKPOINT), or `method`: that method's model in the config's run
    directory (`cadpo` -> `<run_dir>/models/cadpo`, `base` -> the run's base model), so a cluster names its
    shared storage once, in the config; `config` (YAML file or list of files layered; defaults otherwise),
    `base` (base model of an adapter), `engine` (auto | transformers | vllm), `overrides` (dotted config
    overrides).
    """
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise ValueError(f"unknown build_app args {unknown}; expected {', '.join(BUILD_ARGS)}")
    cfg = load_config(args.get("config"), list(args.get("overrides") or []))
    if args.get("checkpoint") and args.get("method"):
        raise ValueError("pass args.checkpoint or args.method, not both")
    if args.get("method"):
        checkpoint = RunLayout.of(cfg).eval_model(args["method"])
    else:
        checkpoint = args.get("checkpoint") or os.environ.get("INBOL_CHECKPOINT")
    if not checkpoint:
        raise ValueError("no checkpoint: pass args.checkpoint, args.method or set INBOL_CHECKPOINT")
    checkpoint = dio.absolute(checkpoint)
    base = dio.absolute(args["base"]) if args.get("base") else None
    engine = args.get("engine", "auto")
    choose_engine(engine, gpu=False, vllm_installed=False)  # reject a bad name here, not in a replica
    ckpt.resolve(checkpoint, base)  # fail the deploy on a missing checkpoint, not in every replica
    model = ModelDeployment.options(
        autoscaling_config=autoscaling_config(cfg.serve),
        max_ongoing_requests=cfg.serve.max_ongoing_requests,
        ray_actor_options=actor_options(cfg.sampling),
    ).bind(checkpoint, cfg, base, engine)
    return IngressDeployment.options(
        max_ongoing_requests=ingress_capacity(cfg.serve), ray_actor_options={"num_cpus": 0}
    ).bind(model, cfg, args.get("method") or model_name(checkpoint))
