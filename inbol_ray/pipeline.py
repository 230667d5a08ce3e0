"""The end-to-end pipeline as an ordered list of stages, each skipped when its manifest matches.

Each stage is a plain function `(ctx) -> counts`; the runner prints one progress line per stage with
its elapsed time, and writes the stage's manifest (config hash of the sections it depends on) only
after its outputs are complete, so a crashed run resumes at the first unfinished stage.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from inbol_ray import manifest
from inbol_ray.config import Config
from inbol_ray.data import io as dio


@dataclass
class Context:
    cfg: Config
    run_dir: str
    log: Callable[[str], None] = print

    def path(self, *parts: str) -> str:
        return dio.join(self.run_dir, *parts)

    def items(self) -> pa.Table:
        return dio.read_table(self.path("items"))


@dataclass(frozen=True)
class Stage:
    name: str
    depends_on: tuple[str, ...]
    """Config sections whose content decides whether an existing output can be reused."""
    run: Callable[[Context], dict[str, Any]]


def _prepare(ctx: Context) -> dict[str, Any]:
    from inbol_ray.data.prepare import run_prepare

    result = run_prepare(ctx.cfg, run_dir=ctx.run_dir)
    ctx.log("  " + result.summary_line())
    return result.counts


def model_dir(ctx: Context, name: str) -> str:
    return ctx.path("models", name)


def _base_model(ctx: Context) -> dict[str, Any]:
    """Embedded default only: build the tiny checkpoint, train it briefly, report its boundary."""
    from inbol_ray.data.shapes import invented_names, rare_combos
    from inbol_ray.model.base_train import family_accuracy, train_base
    from inbol_ray.model.tiny import build_tiny_checkpoint

    cfg = ctx.cfg
    init = Path(model_dir(ctx, "init"))
    build_tiny_checkpoint(init, cfg.model, cfg.data.shapes)
    base = train_base(init, ctx.items(), model_dir(ctx, "base"), cfg.base_train, log=ctx.log)
    names = invented_names(cfg.data.shapes.n_names, cfg.data.shapes.seed)
    rare = {names[k] for k in rare_combos(names, cfg.data.shapes)}
    acc = family_accuracy(base, ctx.items(), "shapes_id_test", rare, max_new_tokens=cfg.eval.max_new_tokens)
    ctx.log("  base model accuracy by question family on shapes_id_test (greedy):")
    for family, (n, a) in acc.items():
        ctx.log(f"    {family:<18} n={n:<4} acc={a:6.1%}")
    return {"family_accuracy": {k: {"n": n, "acc": a} for k, (n, a) in acc.items()}}


def base_model_dir(ctx: Context) -> str:
    """The model InBoL starts from: the trained tiny base (embedded default) or the user's checkpoint."""
    return model_dir(ctx, "base") if ctx.cfg.model.build_tiny else ctx.cfg.model.path


def _sample(ctx: Context) -> dict[str, Any]:
    from inbol_ray.sampling.stage import run_sampling

    result = run_sampling(ctx.cfg, ctx.run_dir, base_model_dir(ctx), split="train", log=ctx.log)
    ctx.log("  " + result.summary_line())
    return result.counts


def _construct(ctx: Context) -> dict[str, Any]:
    from inbol_ray.boundary.tables import run_construct

    result = run_construct(ctx.cfg.construct, ctx.run_dir, ctx.path("items"), ctx.path("samples"))
    ctx.log("  " + result.summary_line())
    return result.counts


def dpo_start_dir(ctx: Context) -> str:
    """The model the DPO methods start from and score their reference with (`train.dpo_init`)."""
    return model_dir(ctx, "idk_it") if ctx.cfg.train.dpo_init == "idk_it" else base_model_dir(ctx)


def _reference(ctx: Context) -> dict[str, Any]:
    from inbol_ray.train.trainer import run_reference_pass

    return run_reference_pass(
        ctx.cfg, ctx.path("tables", "cadpo_pairs"), dpo_start_dir(ctx), ctx.path("tables", "cadpo_pairs_ref")
    )


def _train(method: str) -> Callable[[Context], dict[str, Any]]:
    def run(ctx: Context) -> dict[str, Any]:
        from inbol_ray.train.trainer import METHOD_TABLES, run_training

        table = METHOD_TABLES[method] + ("_ref" if method in DPO_METHODS else "")
        result = run_training(
            ctx.cfg,
            method,
            ctx.path("tables", table),
            dpo_start_dir(ctx) if method in DPO_METHODS else base_model_dir(ctx),
            model_dir(ctx, method),
            log=ctx.log,
        )
        ctx.log("  " + result.summary_line())
        return {"steps": result.steps, "seconds": round(result.seconds, 1), **result.final_metrics}

    return run


def _evaluate(ctx: Context) -> dict[str, Any]:
    from inbol_ray.eval.evaluate import run_evaluation

    models = {}
    for method in ctx.cfg.eval.methods:
        models[method] = (
            base_model_dir(ctx) if method in ("base", "refusal_prompt") else model_dir(ctx, method)
        )
    result = run_evaluation(ctx.cfg, ctx.run_dir, models, ctx.path("items"), log=ctx.log)
    ctx.log("  " + result.summary_line())
    return {"predictions": result.predictions_uri, "metrics": result.metrics_uri}


def _report(ctx: Context) -> dict[str, Any]:
    from inbol_ray.eval.base_confidence import compute_base_confidence
    from inbol_ray.eval.report import write_report

    cfg = ctx.cfg
    conf_uri = compute_base_confidence(cfg, ctx.run_dir, base_model_dir(ctx), ctx.path("items"), log=ctx.log)
    report = write_report(
        ctx.run_dir, confidence_uri=conf_uri, methods=cfg.eval.methods, bins=cfg.eval.conf_bins
    )
    ctx.log(f"  report -> {report}")
    return {"report": report}


DPO_METHODS = ("dpo1", "dpo2", "dpo3", "cadpo")
TRAINED_METHODS = ("sft", "idk_it", *DPO_METHODS)


def stages(cfg: Config) -> list[Stage]:
    """Stages in order; `depends_on` lists the config sections that decide whether an output is reusable."""
    out = [Stage("prepare", ("data",), _prepare)]
    if cfg.model.build_tiny:
        out.append(Stage("base_model", ("model", "base_train"), _base_model))
    out += [
        Stage("sample", ("sampling", "grading"), _sample),
        Stage("construct", ("construct",), _construct),
    ]
    methods = [m for m in TRAINED_METHODS if m in cfg.eval.methods]
    dpo = [m for m in methods if m in DPO_METHODS]
    if dpo and cfg.train.dpo_init == "idk_it" and "idk_it" not in methods:
        methods.insert(0, "idk_it")  # the DPO methods start from it, evaluated or not
    out += [Stage(f"train_{m}", ("train",), _train(m)) for m in methods if m not in DPO_METHODS]
    if dpo:
        out.append(Stage("reference", ("model", "train"), _reference))
    out += [Stage(f"train_{m}", ("train",), _train(m)) for m in dpo]
    out += [Stage("evaluate", ("eval",), _evaluate), Stage("report", ("eval", "sampling"), _report)]
    return out


def run_pipeline(cfg: Config, run_dir: str, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    ctx = Context(cfg=cfg, run_dir=dio.absolute(run_dir), log=log)
    all_stages = stages(cfg)
    results: dict[str, dict[str, Any]] = {}
    t_start = time.time()
    upstream_hash = ""
    for i, stage in enumerate(all_stages, 1):
        # A stage's hash covers its own sections and everything upstream, so changing the data
        # config reruns sampling, construction and training, not just the prepare stage.
        upstream_hash = hashlib.sha256(
            (upstream_hash + cfg.section_hash(*stage.depends_on)).encode()
        ).hexdigest()[:16]
        head = f"[{i}/{len(all_stages)}] {stage.name}"
        if manifest.is_done(ctx.run_dir, stage.name, upstream_hash):
            log(f"{head}: up to date, skipped")
            results[stage.name] = manifest.read_manifest(ctx.run_dir, stage.name)["counts"]
            continue
        log(f"{head}: running")
        t0 = time.time()
        manifest.clear_manifest(ctx.run_dir, stage.name)
        counts = stage.run(ctx)
        manifest.write_manifest(
            ctx.run_dir, stage.name, upstream_hash, counts, seconds=round(time.time() - t0, 1)
        )
        results[stage.name] = counts
        log(f"{head}: done in {time.time() - t0:.0f}s (total {time.time() - t_start:.0f}s)")
    return results
