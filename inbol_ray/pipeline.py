"""The stages of a run, what each depends on, and the runner that skips what is already done.

A stage is a plain function `(ctx) -> counts` plus what its output is made from: config sections and the
outputs of earlier stages. Its hash is the fingerprint of both (computed from the config alone, before
anything runs), so a changed section reruns exactly the stages downstream of it, and changing
`construct.tau_idk` never throws away samples. A manifest (`RunLayout.manifest(stage)`) is written only
after a stage's outputs are complete, so a crashed run resumes at the first unfinished stage.

`jobs.pipeline` runs them all (or `--only` / `--until`); every stage job (`jobs.sample_confidence`, ...)
runs its own stages through the same `run_pipeline`, with the same manifests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from inbol_ray import hub, manifest
from inbol_ray import methods as M
from inbol_ray.config import Config
from inbol_ray.input_identity import data_identity, model_identity
from inbol_ray.run_layout import RunLayout
from inbol_ray.tracking import Tracking, open_tracking


class StageError(ValueError):
    """A stage selection that cannot run: unknown names, or inputs that are missing or stale."""


@dataclass
class Context:
    cfg: Config
    layout: RunLayout
    log: Callable[[str], None] = print
    extras: dict[str, Any] = field(default_factory=dict)
    """What a job prepared before Ray started (e.g. parsed data sources), by stage."""
    tracking: Tracking = field(default_factory=Tracking)
    """The run's experiment tracker (`inbol_ray.tracking`; off unless `tracking.backend` says)."""


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]
    """Config sections whose content decides whether an existing output can be reused."""
    run: Callable[[Context], dict[str, Any]]
    inputs: tuple[str, ...] = ()
    """Stages whose outputs this one reads: their hashes are part of its hash."""


def _prepare(ctx: Context) -> dict[str, Any]:
    from inbol_ray.data.prepare import run_prepare

    result = run_prepare(ctx.cfg, ctx.layout, sources=ctx.extras.get("prepare"))
    ctx.log("  " + result.summary_line())
    # per data set: read / items / quarantined; and how many mismatched unanswerable rows were built, and why not
    return {**result.counts, **({"mismatch": result.mismatch} if result.mismatch else {})}


def _base_model(ctx: Context) -> dict[str, Any]:
    """Embedded default only: build the tiny checkpoint, train it briefly, report its boundary.

    The builder writes local files: on object storage it builds in a temporary folder and copies it over
    (`train_base` and the loaders read and write URIs themselves).
    """
    import tempfile

    from inbol_ray.checkpoint import upload_dir
    from inbol_ray.data import io as dio
    from inbol_ray.data.shapes_questions import invented_names, rare_combos
    from inbol_ray.model.base_train import family_accuracy, train_base
    from inbol_ray.model.tiny import build_tiny_checkpoint

    cfg, layout = ctx.cfg, ctx.layout
    items = dio.read_table(layout.items)
    with tempfile.TemporaryDirectory() as tmp:
        init = f"{tmp}/init" if dio.is_uri(layout.root) else layout.tiny_init
        build_tiny_checkpoint(init, cfg.model, cfg.data.shapes, cfg.prompt)
        upload_dir(init, layout.tiny_init)  # a no-op when init already is the run's folder
        train_base(
            init,
            items,
            layout.base_model,
            cfg.base_train,
            log=ctx.log,
            prompt=cfg.prompt,
            image_aspect=cfg.model.image_aspect,
        )
    names = invented_names(cfg.data.shapes.n_names, cfg.data.shapes.seed)
    rare = {names[k] for k in rare_combos(names, cfg.data.shapes)}
    acc = family_accuracy(
        layout.base_model,
        items,
        "shapes_val",
        rare,
        max_new_tokens=cfg.eval.max_new_tokens,
        prompt=cfg.prompt,
        image_aspect=cfg.model.image_aspect,
    )
    ctx.log("  base model accuracy by question family on shapes_val, answerable items (greedy):")
    for family, (n, a) in acc.items():
        ctx.log(f"    {family:<18} n={n:<4} acc={a:6.1%}")
    return {"family_accuracy": {k: {"n": n, "acc": a} for k, (n, a) in acc.items()}}


def _sample(ctx: Context) -> dict[str, Any]:
    from inbol_ray.sampling.stage import run_sampling

    result = run_sampling(ctx.cfg, ctx.layout, log=ctx.log)
    ctx.log("  " + result.summary_line())
    return result.counts


def _construct(ctx: Context) -> dict[str, Any]:
    from inbol_ray.boundary.tables import run_construct

    result = run_construct(ctx.cfg, ctx.layout)
    ctx.log("  " + result.summary_line())
    return result.counts


def _reference(ctx: Context) -> dict[str, Any]:
    from inbol_ray.train.reference import run_reference_pass

    return run_reference_pass(ctx.cfg, ctx.layout, log=ctx.log)


def _train(method: str) -> Callable[[Context], dict[str, Any]]:
    def run(ctx: Context) -> dict[str, Any]:
        from inbol_ray.train.trainer import run_training

        # it logs its summary line
        result = run_training(ctx.cfg, method, ctx.layout, log=ctx.log, tracking=ctx.tracking)
        return {"steps": result.steps, "seconds": round(result.seconds, 1), **result.final_metrics}

    return run


def _evaluate(ctx: Context) -> dict[str, Any]:
    from inbol_ray.eval.evaluate import run_evaluation

    result = run_evaluation(ctx.cfg, ctx.layout, log=ctx.log)
    ctx.log("  " + result.summary_line())
    return {"predictions": result.predictions_uri, "metrics": result.metrics_uri}


def _report(ctx: Context) -> dict[str, Any]:
    from inbol_ray.eval.base_confidence import compute_base_confidence
    from inbol_ray.eval.report import write_report

    compute_base_confidence(ctx.cfg, ctx.layout, log=ctx.log)
    report = write_report(ctx.cfg, ctx.layout, log=ctx.log)
    ctx.log(f"  report -> {report}")
    return {"report": report}


def stages(cfg: Config) -> list[Stage]:
    """Stages in the order they run, with what each one's output is made from."""
    base = ("base_model",) if cfg.model.build_tiny else ("prepare",)
    out = [Stage("prepare", ("data",), _prepare)]
    if cfg.model.build_tiny:
        out.append(Stage("base_model", ("model", "base_train", "prompt"), _base_model, ("prepare",)))
    out += [
        Stage("sample", ("model", "sampling", "grading", "prompt"), _sample, ("prepare", *base)),
        Stage("construct", ("construct",), _construct, ("prepare", "sample")),
    ]
    trained = M.training_order(cfg.eval.methods, cfg.train.dpo_init)

    def start(method: str) -> tuple[str, ...]:
        first = M.start_method(method, cfg.train.dpo_init)
        return (f"train_{first}",) if first else base

    for method in trained:
        if M.method(method).needs_reference and not any(s.name == "reference" for s in out):
            out.append(Stage("reference", ("model", "train"), _reference, ("construct", *start(method))))
        inputs = ("reference",) if M.method(method).needs_reference else ("construct",)
        out.append(Stage(f"train_{method}", ("model", "train"), _train(method), inputs + start(method)))
    evaluated = tuple(f"train_{m}" for m in trained if m in cfg.eval.methods)
    out += [
        Stage(
            "evaluate",
            ("model", "sampling", "grading", "prompt", "eval"),
            _evaluate,
            ("prepare", *base, *evaluated),
        ),
        Stage("report", ("sampling", "grading", "eval"), _report, ("evaluate",)),
    ]
    return out


def stage_hashes(cfg: Config, all_stages: Sequence[Stage]) -> dict[str, str]:
    """Each stage's hash: its config sections and its inputs' hashes (so, transitively, everything
    upstream), with the outside inputs by identity (`input_identity`: the data sets' files, `model.path`'s
    checkpoint). Computed before anything runs, so a job can check its inputs before starting Ray."""
    outside = {"data": data_identity(cfg.data), "model": model_identity(cfg.model)}
    hashes: dict[str, str] = {}
    for stage in all_stages:
        hashes[stage.name] = manifest.fingerprint(
            {s: _hashed_section(cfg, s, outside) for s in stage.sections},
            {name: hashes[name] for name in stage.inputs},
        )
    return hashes


def _hashed_section(cfg: Config, name: str, outside: dict[str, Any]) -> Any:
    """A config section as stages see it. `train.method` only picks what `jobs.train` runs (each training
    stage is named for its method), so it is left out: a model trained by `jobs.train method=sft` is the
    pipeline's `train_sft` output, not one "made with another config"; `construct.window_rows` and
    `data.max_line_bytes` change memory or a guard, not tables. ShapesWorld's items are also a function of
    its generator's version (a changed world must not reuse an old run's items); read data sets and a
    given base model enter by the identity of their files."""
    section = getattr(cfg, name)
    if name == "data":
        kept = {k: v for k, v in asdict(section).items() if k != "max_line_bytes"}
        if section.source == "shapes":
            from inbol_ray.data.shapes import VERSION

            return [kept, VERSION]
        return [kept, outside["data"]]
    if name == "model":
        return section if outside["model"] is None else [section, outside["model"]]
    if name == "construct":  # bounds memory only: the tables are the same for any window
        return {k: v for k, v in asdict(section).items() if k != "window_rows"}
    return replace(section, method="") if name == "train" else section


def fresh(layout: RunLayout, stage: Stage, config_hash: str) -> bool:
    """Whether `stage`'s output can be reused: its manifest's hash matches, and it was made from the
    outputs its inputs hold now (the token each input's manifest had when this one was written). The hash
    alone cannot see an input rerun with the same config (a manifest deleted to force a retraining): its
    downstream would keep results of the old weights."""
    return manifest.is_done(layout.manifest(stage.name), config_hash, _input_tokens(layout, stage))


def _input_tokens(layout: RunLayout, stage: Stage) -> dict[str, str | None]:
    return {name: manifest.token(layout.manifest(name)) for name in stage.inputs}


def select(all_stages: Sequence[Stage], only: Sequence[str] = (), until: str = "") -> list[Stage]:
    """The stages to run: all, the `only` ones, or everything up to and including `until`."""
    names = [s.name for s in all_stages]
    unknown = [n for n in [*only, *([until] if until else [])] if n not in names]
    if unknown:
        raise StageError(f"unknown stage(s) {unknown}; this config's stages: {', '.join(names)}")
    chosen = [s for s in all_stages if not only or s.name in only]
    if until:
        chosen = [s for s in chosen if names.index(s.name) <= names.index(until)]
    return chosen


def stale_inputs(cfg: Config, layout: RunLayout, chosen: Sequence[Stage]) -> list[str]:
    """Inputs of the chosen stages that no chosen stage makes and no current manifest vouches for."""
    all_stages = stages(cfg)
    by_name = {s.name: s for s in all_stages}
    hashes = stage_hashes(cfg, all_stages)
    making = {s.name for s in chosen}
    problems = []
    for stage in chosen:
        for name in stage.inputs:
            if name in making or fresh(layout, by_name[name], hashes[name]):
                continue
            found = manifest.read_manifest(layout.manifest(name))
            why = "not run yet" if found is None else "made with another config"
            problems.append(f"{stage.name} needs the output of {name} ({why}): run that stage first")
    return sorted(set(problems))


def _in_dependency_order(
    todo: Sequence[Stage], run_one: Callable[[Stage], dict[str, Any]], concurrent: int
) -> list[tuple[Stage, dict[str, Any]]]:
    """Run `todo` (in stage order) with up to `concurrent` at once, each as soon as every input it takes
    from `todo` has finished. The first failure stops new starts; running stages finish, then it raises."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    waiting, finished, out = list(todo), set(), []
    names = {s.name for s in todo}
    with ThreadPoolExecutor(max_workers=concurrent, thread_name_prefix="stage") as pool:
        running: dict[Any, Stage] = {}
        error: BaseException | None = None
        while waiting or running:
            while error is None and len(running) < concurrent:
                ready = next(
                    (s for s in waiting if all(i in finished or i not in names for i in s.inputs)), None
                )
                if ready is None:
                    break
                waiting.remove(ready)
                running[pool.submit(run_one, ready)] = ready
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                stage = running.pop(future)
                if future.exception() is not None:
                    error = error or future.exception()
                else:
                    finished.add(stage.name)
                    out.append((stage, future.result()))
        if error is not None:
            raise error
    return out


def run_pipeline(
    cfg: Config,
    layout: RunLayout,
    *,
    only: Sequence[str] = (),
    until: str = "",
    log: Callable[[str], None] = print,
    extras: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the selected stages (Ray must be initialised), skipping those already done: in stage order, or
    with `ray.concurrent_stages` > 1 up to that many at once, each when its inputs are finished."""
    all_stages = stages(cfg)
    chosen = select(all_stages, only, until)
    problems = stale_inputs(cfg, layout, chosen)
    if problems:
        raise StageError("; ".join(problems))
    hashes = stage_hashes(cfg, all_stages)
    # A base named by Hub id: the commit its revision resolved to, in every manifest of a stage reading it.
    hub_model = None if cfg.model.build_tiny else hub.identity(cfg.model.path)
    tracking = open_tracking(cfg, layout, hashes, log)  # one parent run; a child per stage
    ctx = Context(cfg=cfg, layout=layout, log=log, extras=extras or {}, tracking=tracking)
    results: dict[str, dict[str, Any]] = {}
    t_start = time.time()
    heads = {stage.name: f"[{i}/{len(chosen)}] {stage.name}" for i, stage in enumerate(chosen, 1)}
    todo: list[Stage] = []
    for stage in chosen:  # in stage order: an input that reruns makes its readers rerun
        uri = layout.manifest(stage.name)
        rerun_input = any(name in {t.name for t in todo} for name in stage.inputs)
        if not rerun_input and fresh(layout, stage, hashes[stage.name]):
            log(f"{heads[stage.name]}: up to date, skipped")
            results[stage.name] = manifest.read_manifest(uri)["counts"]
            tracking.skipped(stage.name, hashes[stage.name], results[stage.name])
        else:
            todo.append(stage)

    def run_one(stage: Stage) -> dict[str, Any]:
        log(f"{heads[stage.name]}: running")
        t0 = time.time()
        uri = layout.manifest(stage.name)
        with tracking.stage(stage.name, hashes[stage.name]) as tracked:
            manifest.clear_manifest(uri)
            counts = stage.run(ctx)
            manifest.write_manifest(
                uri,
                stage.name,
                hashes[stage.name],
                counts,
                inputs=_input_tokens(layout, stage),
                seconds=round(time.time() - t0, 1),
                **({"model": hub_model} if hub_model and "model" in stage.sections else {}),
            )
            tracked.done(counts)
        log(f"{heads[stage.name]}: done in {time.time() - t0:.0f}s (total {time.time() - t_start:.0f}s)")
        return counts

    # Local-mode trainings run torch in this process (global threads and seeds): one stage at a time.
    concurrent = cfg.ray.concurrent_stages if cfg.train.num_workers > 0 else 1
    try:
        for stage, counts in _in_dependency_order(todo, run_one, concurrent):
            results[stage.name] = counts
    except BaseException:
        tracking.close(results, ok=False)
        raise
    tracking.close(results, ok=True)  # evaluation metrics, report, figures and manifests onto the parent
    return results
