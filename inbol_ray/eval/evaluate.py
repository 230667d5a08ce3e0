"""The evaluate stage: every method's model x every evaluation set -> `predictions` and `metrics` tables.

    result = run_evaluation(cfg, RunLayout.of(cfg))

Each method's answers come from the one generate-over-items stage (`inbol_ray.generation.stage`): a Ray
Data pass over the evaluation items through an actor pool of the shared samplers (vLLM or transformers as
`sampling.engine` says), greedy decoding, graded in the pipeline with each item's metric and the refusal
detector. With the transformers engine every method shares one pass (actors switch models between
methods); a vLLM engine gets a pass per method. Answers do not depend on batch size or actor count
(fixed batch shapes, see `inbol_ray.model.generation`).

Where things are (`RunLayout`): a method is evaluated with `layout.eval_model(method)` (its trained model,
or the base for the untrained baselines); a LoRA method is its adapter, loaded on the base by the engine
(never a merged copy on disk). Its graded answers are shards under
`layout.eval_shards(method)`, reused on rerun while the checkpoint files, prompt, decoding and items are
unchanged, so changing one checkpoint re-evaluates only that method. Then `layout.predictions` (model =
method name, dataset, id, response, correct, refused) and `layout.metrics` (method, dataset, n, acc,
refr, s_trust as fractions; reports show x100) are rewritten from every method's shards.

Every method sees the prompt sampling and training saw (`model.prompt.render_prompt` under `cfg.prompt`:
the question, its options, LLaVA-1.5's instruction); the method table says which method adds the refusal
clause (`Method.refusal_prompt`), and that clause is its only difference from `base`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa

from inbol_ray import methods as M
from inbol_ray import schema as S
from inbol_ray.config import Config
from inbol_ray.data import io as dio
from inbol_ray.generation.actor import Decoding
from inbol_ray.generation.grade import PREDICTIONS, grade_predictions
from inbol_ray.generation.shards import Selection
from inbol_ray.generation.stage import SHARD_ROWS, GenerationResult, Job, run_generations
from inbol_ray.metrics import metrics_table
from inbol_ray.run_layout import RunLayout

EVAL_SPLITS = ("val", "id_test", "ood_test", "unanswerable_test")
"""Item splits that are evaluated (DESIGN.md 6: the test splits, and `val` on which settings are chosen);
tables in the report are grouped by these."""
__all__ = [
    "EVAL_SPLITS",
    "EvalResult",
    "eval_job",
    "grade_predictions",
    "method_refuses",
    "run_evaluation",
]


def method_refuses(method: str) -> bool:
    """The refusal-prompt baseline asks the base model to refuse when unsure; nothing else changes."""
    return M.method(method).refusal_prompt


def eval_selection(datasets: Sequence[str] | None) -> Selection:
    """The named data sets, or every set in an evaluation split."""
    if datasets:
        return Selection(datasets=tuple(sorted(datasets)))
    return Selection(splits=EVAL_SPLITS)


def eval_job(
    cfg: Config,
    layout: RunLayout,
    method: str,
    model_dir: str,
    selection: Selection,
    shard_rows: int = SHARD_ROWS,
    refusal: bool | None = None,
) -> Job:
    """Greedy answers of `method` (its prompt variant; `refusal` overrides it, for models that are not
    methods) graded into predictions under its shard folder."""
    refusal = method_refuses(method) if refusal is None else refusal
    return Job(
        stage=f"evaluate_{method}",
        items_uri=layout.items,
        out_uri=layout.eval_shards(method),
        quarantine_uri=layout.quarantine(f"evaluate_{method}"),
        model_dir=model_dir,
        decoding=Decoding.greedy(cfg.eval.max_new_tokens, refusal, cfg.sampling.seed),
        output=PREDICTIONS,
        selection=selection,
        method=method,
        shard_rows=shard_rows,
        batch_size=cfg.eval.batch_size,
    )


def score_line(scores) -> str:
    """One `metrics` row (a data set of one model) as the stages print it."""
    return (
        f"{scores[S.DATASET]:<28} n={int(scores[S.N]):<5} acc={scores[S.ACC]:6.1%} refr={scores[S.REFR]:6.1%} "
        f"s_trust={100 * scores[S.S_TRUST]:+7.2f}"
    )


@dataclass
class EvalResult:
    predictions_uri: str
    metrics_uri: str
    metrics: pd.DataFrame
    runs: dict[str, GenerationResult] = field(default_factory=dict)

    @property
    def computed(self) -> list[str]:
        return [m for m, r in self.runs.items() if r.shards_reused < r.shards]

    def summary_line(self) -> str:
        reused = len(self.runs) - len(self.computed)
        return (
            f"evaluate: {len(self.metrics)} (method, data set) cells, {len(self.runs)} method(s) "
            f"({reused} fully reused) -> {self.metrics_uri}"
        )

    @property
    def counts(self) -> dict[str, object]:
        return {m: r.counts for m, r in self.runs.items()}


def run_evaluation(
    cfg: Config,
    layout: RunLayout,
    *,
    methods: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> EvalResult:
    """Evaluate each method (default `cfg.eval.methods`) on each evaluation set (Ray must be initialised).

    `datasets`: set names (default: `cfg.eval.datasets`, else every set whose split is an evaluation split).
    A method whose checkpoint is missing raises (the caller decides whether to skip it).
    """
    selection = eval_selection(datasets or cfg.eval.datasets or None)
    result = EvalResult(layout.predictions, layout.metrics, pd.DataFrame())
    chosen = list(methods or cfg.eval.methods)
    jobs = []
    for method in chosen:
        jobs.append(eval_job(cfg, layout, method, layout.eval_model(method), selection))
    # One pass for every method where the engine can switch models cheaply (transformers); vLLM engines
    # get a pass each, so the actor that held one engine exits and frees its GPU memory before the next.
    passes = [jobs] if cfg.sampling.engine == "transformers" else [[job] for job in jobs]
    for batch in passes:
        for job, run in zip(batch, run_generations(cfg, batch, log=log), strict=True):
            result.runs[job.method] = run
    for run in result.runs.values():
        check_run(run, selection, layout)
    result.metrics = write_predictions(layout, list(result.runs))
    for method, run in result.runs.items():
        log(f"  {method}: {run.summary_line()}")
        log_scores(result.metrics, method, log)
    return result


def check_run(run: GenerationResult, selection: Selection, layout: RunLayout) -> None:
    if run.items == 0:
        raise ValueError(f"no evaluation items in {layout.items} ({selection})")
    if selection.datasets and set(run.datasets) != set(selection.datasets):
        missing = sorted(set(selection.datasets) - set(run.datasets))
        raise ValueError(f"evaluation data set(s) not in items: {missing}")


def log_scores(metrics: pd.DataFrame, model: str, log: Callable[[str], None]) -> pd.DataFrame:
    """Print one score line per data set of `model` from the run's metrics (`write_predictions`' result:
    the answers are not read again); returns those rows."""
    rows = metrics[metrics[S.METHOD] == model].sort_values(S.DATASET)
    for _, scores in rows.iterrows():
        log("    " + score_line(scores))
    return rows


def evaluate_checkpoint(
    cfg: Config,
    layout: RunLayout,
    name: str,
    location: str,
    *,
    datasets: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[pd.DataFrame, GenerationResult]:
    """Score any local image-text-to-text checkpoint (`location`: a directory or URI) on the run's
    evaluation sets under `name`, with the methods' prompts, greedy decoding and grading (Ray must be
    initialised). LLaVA-1.5 checkpoints go the methods' way; other architectures are asked through their
    own chat template (`model.chat_format`), by vLLM or transformers as `sampling.engine` says. The model is
    registered (`eval.models`) and the run's predictions and metrics rebuilt with it; returns its metrics
    rows and the generation's result (rerunning reuses its answers while checkpoint and items hold)."""
    from inbol_ray.eval import models
    from inbol_ray.model.chat_format import checkpoint_config

    models.claim(layout, name, "checkpoint")
    config = checkpoint_config(location)  # fails here, with the path, when the location is no checkpoint
    arch = str(config["model_type"])
    engine = engine_for(cfg.sampling.engine, config)
    if engine != cfg.sampling.engine:
        log(f"  {name}: vLLM has no implementation of this {arch} checkpoint; scoring it with transformers")
        cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, engine=engine))
    selection = eval_selection(datasets or cfg.eval.datasets or None)
    job = eval_job(cfg, layout, name, location, selection, refusal=False)
    (run,) = run_generations(cfg, [job], log=log)
    check_run(run, selection, layout)
    models.register(layout, models.ExternalModel(name, "checkpoint", location, arch))
    metrics = write_predictions(layout, run_methods(cfg, layout))
    log(f"  {name} ({arch}): {run.summary_line()}")
    return log_scores(metrics, name, log), run


def engine_for(engine: str, config: dict) -> str:
    """`chat_format.choose_engine` for a checkpoint's `config.json`, the installed vLLM asked in a worker
    process (so the driver never imports it)."""
    import ray

    from inbol_ray.model.chat_format import choose_engine, vllm_architectures

    def supported() -> frozenset[str]:
        return ray.get(ray.remote(num_cpus=0, max_calls=1)(vllm_architectures).remote())

    return choose_engine(engine, config, supported)


def run_methods(cfg: Config, layout: RunLayout) -> list[str]:
    """The run's methods that have evaluation answers (what the run's predictions hold besides other
    models)."""
    return [m for m in cfg.eval.methods if dio.exists(layout.eval_shards(m))]


def write_predictions(layout: RunLayout, methods: Sequence[str]) -> pd.DataFrame:
    """Rebuild the run's `predictions` (sorted by model, data set, id) from the answers of `methods` and of
    every registered model (`eval.models`), and the `metrics` computed from them; returns the metrics."""
    from inbol_ray.eval.models import registered

    names = [n for n in dict.fromkeys([*methods, *registered(layout)]) if dio.exists(layout.eval_shards(n))]
    tables = [
        S.conform(dio.read_table(layout.eval_shards(n)), S.PREDICTIONS, layout.eval_shards(n)) for n in names
    ]
    predictions = pa.concat_tables(tables)
    predictions = predictions.sort_by([(S.MODEL, "ascending"), (S.DATASET, "ascending"), (S.ID, "ascending")])
    dio.write_table(predictions, layout.predictions)
    metrics = metrics_table(predictions.to_pandas())
    table = pa.Table.from_pandas(metrics, preserve_index=False)
    dio.write_table(S.conform(table, S.METRICS_TABLE, "metrics"), layout.metrics)
    return metrics
