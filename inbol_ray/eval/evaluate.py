"""The evaluate stage: every model x every evaluation set -> `predictions` and `metrics` tables.

    models = {"base": ".../models/base", "refusal_prompt": ".../models/base", "cadpo": ".../models/cadpo"}
    run_evaluation(cfg, run_dir, models, items_uri)

Each method's answers come from one Ray Data pass over the evaluation items through an actor pool of
the shared samplers (`GenerationActor` holds one `inbol_ray.sampling` Sampler, vLLM or transformers as
`sampling.engine` says, loaded once per actor; greedy decoding); the driver then grades the answers with
each item's metric and the refusal detector. Why the driver grades: answers are a few words, so grading
is cheap string work, and keeping it a pure function (`grade_predictions`) lets tests check it without
Ray. A method saved as a LoRA adapter only is merged into its base once (cached under `eval/merged/`).

Outputs (DESIGN.md sections 3 and 6):
- `<run_dir>/predictions.parquet`: model (= method name), dataset, id, response, correct, refused;
- `<run_dir>/metrics.parquet`: method, dataset, n, acc, refr, s_trust (fractions; reports show x100);
- `<run_dir>/eval/predictions/<method>/<dataset>.parquet` (+ `_<dataset>.json`): one shard per
  (method, dataset), written as soon as that set is complete. A rerun reuses a shard whose fingerprint
  (checkpoint files, prompt, decoding settings, item ids) matches, so a crash costs at most the sets in
  flight and changing one checkpoint re-evaluates only that method.

The `refusal_prompt` method is the base checkpoint with `cfg.eval.refusal_instruction`; every other method
gets `cfg.eval.answer_instruction` (empty by default: the question alone).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from inbol_ray import schema as S
from inbol_ray.boundary import as_list
from inbol_ray.config import Config, EvalConfig, SamplingConfig
from inbol_ray.data import io as dio
from inbol_ray.data.images import decode_image, load_image_bytes
from inbol_ray.grading import grade, is_refusal_response
from inbol_ray.metrics import metrics_table

if TYPE_CHECKING:
    from ray.data import Dataset

REFUSAL_PROMPT = "refusal_prompt"
EVAL_SPLITS = ("id_test", "ood_test", "unanswerable_test")
"""Item splits that are evaluation sets (DESIGN.md 6); tables in the report are grouped by these."""
EVAL_DIR = "eval"
PREDICTIONS_FILE = "predictions.parquet"
METRICS_FILE = "metrics.parquet"
TEXT_COLUMNS = [S.ID, S.DATASET, S.SPLIT, S.ANSWERS, S.CHOICES, S.METRIC, S.ANSWERABLE]
"""What grading needs from `items`: everything but the image, so the driver never holds image bytes."""
INPUT_COLUMNS = [S.ID, S.DATASET, S.IMAGE, S.IMAGE_PATH, S.QUESTION]


# --- checkpoints ------------------------------------------------------------------------------------


def adapter_dir(path: str) -> Path | None:
    """The peft adapter of a checkpoint directory that holds no full model, else None.

    The trainer saves `<models>/<method>/` as a merged HF checkpoint plus `adapter/`; with
    `train.merge=false` only `adapter/` exists (a bare adapter directory is accepted too).
    """
    folder = Path(path)
    if (folder / "config.json").exists():
        return None
    for candidate in (folder / "adapter", folder):
        if (candidate / "adapter_config.json").exists():
            return candidate
    return None


def resolve_checkpoint(path: str, cache_dir: str, base_dir: str | None = None) -> str:
    """A directory every engine can load: `path` itself, or its adapter merged into its base once.

    Why merge here: vLLM and the samplers load full checkpoints only, and a merged model generates as
    fast as the base. The merge is cached in `cache_dir` and redone only when the adapter's files change.
    The base comes from the adapter's `base_model_name_or_path`, else `base_dir`.
    """
    adapter = adapter_dir(path)
    if adapter is None:
        return path
    stamp = json.dumps(checkpoint_stamp(str(adapter)))
    marker = Path(cache_dir) / "_merged_from.json"
    if marker.exists() and marker.read_text() == stamp:
        return cache_dir
    from peft import PeftModel

    from inbol_ray.checkpoint import load_model
    from inbol_ray.checkpoint import to_llava_hf_layout

    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    base = base if base and Path(base).is_dir() else base_dir
    if not base:
        raise FileNotFoundError(f"{path}: adapter without a base model directory to merge into")
    model, processor = load_model(base)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(cache_dir)
    processor.save_pretrained(cache_dir)
    to_llava_hf_layout(Path(cache_dir))
    marker.write_text(stamp)
    return cache_dir


# --- generation: the shared Sampler in a Ray Data actor ------------------------------------------------


@dataclass(frozen=True)
class Decoding:
    """How to answer: greedy (temperature 0, k 1) for evaluation, K samples for the base confidence."""

    instruction: str | None = None
    max_new_tokens: int = 8
    k: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class GenerationActor:
    """Ray Data actor: one `Sampler` (engine from `sampling.engine`) answering batches of items.

    Returns list columns as 1-D object arrays (what map_batches needs for variable-length lists).
    """

    def __init__(self, model_dir: str, sampling: SamplingConfig, dtype: str, decoding: Decoding) -> None:
        import torch

        from inbol_ray.sampling import build_sampler

        # Each actor gets `cpus_per_actor` cores: two actors on two cores must not each start 2+ threads.
        torch.set_num_threads(max(1, int(sampling.cpus_per_actor)))
        self.sampler = build_sampler(sampling.engine, model_dir, sampling, dtype)
        self.decoding = decoding

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        from inbol_ray.sampling import batch_seed

        rows = batch.to_pylist()
        ids = [r[S.ID] for r in rows]
        d = self.decoding
        outs = self.sampler.generate(
            [decode_image(load_image_bytes(r)) for r in rows],
            [r[S.QUESTION] for r in rows],
            k=d.k,
            temperature=d.temperature,
            top_p=d.top_p,
            max_new_tokens=d.max_new_tokens,
            seed=batch_seed(d.seed, ids),  # from the ids, not arrival order: reruns sample the same
            instruction=d.instruction,
        )
        responses = np.empty(len(rows), dtype=object)
        for i, out in enumerate(outs):  # element-wise: numpy would turn equal-length lists into a 2-D array
            responses[i] = list(out)
        return {
            S.ID: np.array(ids, dtype=object),
            S.DATASET: np.array([r[S.DATASET] for r in rows], dtype=object),
            S.RESPONSES: responses,
        }


def read_inputs(items_uri: str, ids: Sequence[str], blocks: int) -> Dataset:
    """The items to answer (id, dataset, image, question) as a materialised Ray Dataset of `blocks` blocks.

    Read before any engine starts: an actor pool holding every CPU of a small machine would otherwise
    leave Ray Data's file-listing task waiting forever. Images go from Parquet to the object store
    (spilled to disk when large), never through the driver; `blocks` >= the number of actors so that
    every actor gets work.
    """
    import ray
    from ray.data.expressions import col

    fs, path = dio.resolve(items_uri)
    ds = ray.data.read_parquet(path, filesystem=fs, columns=INPUT_COLUMNS)
    return ds.filter(expr=col(S.ID).is_in(list(ids))).repartition(blocks).materialize()


def stream_responses(
    source: Dataset,
    expected: Mapping[str, int],
    model_dir: str,
    sampling: SamplingConfig,
    decoding: Decoding,
    *,
    batch_size: int,
    dtype: str = "float32",
) -> Iterator[tuple[str, pd.DataFrame]]:
    """Responses (id, dataset, responses) for every row of `source` (a materialised Ray Dataset from
    `read_inputs`), yielded one data set at a time as soon as all `expected[dataset]` rows are back."""
    import ray

    ds = source.map_batches(
        GenerationActor,
        fn_constructor_kwargs={
            "model_dir": str(model_dir),
            "sampling": sampling,
            "dtype": dtype,
            "decoding": decoding,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=sampling.num_actors),
        num_cpus=sampling.cpus_per_actor,
        num_gpus=sampling.gpus_per_actor or None,
    )
    parts: dict[str, list[pd.DataFrame]] = {}
    seen: dict[str, int] = {}
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
        for dataset, frame in batch.groupby(S.DATASET, sort=False):
            parts.setdefault(dataset, []).append(frame)
            seen[dataset] = seen.get(dataset, 0) + len(frame)
            if seen[dataset] == expected[dataset]:
                yield dataset, pd.concat(parts.pop(dataset), ignore_index=True)
    missing = {d: int(n) - seen.get(d, 0) for d, n in expected.items() if seen.get(d, 0) != n}
    if missing:
        raise RuntimeError(f"generation lost rows (data set: rows missing): {missing}")


# --- grading -----------------------------------------------------------------------------------------


def grade_predictions(
    text: pd.DataFrame, responses: pd.DataFrame, method: str, correct_at: float
) -> pd.DataFrame:
    """Greedy responses graded against their items: one `predictions` row per item (schema.PREDICTIONS).

    Unanswerable items are never correct; a refusal is detected with `is_refusal_response`, so picking a
    multiple-choice option that is itself a refusal (BeyondVisQA) counts as refusing.
    """
    merged = responses.merge(text, on=[S.DATASET, S.ID], how="left", validate="one_to_one")
    rows: dict[str, list] = {name: [] for name in S.PREDICTIONS.names}
    for rec in merged.itertuples(index=False):
        item = rec._asdict()
        response = str(as_list(item[S.RESPONSES])[0])
        choices = [str(c) for c in as_list(item[S.CHOICES])] or None
        answers = [str(a) for a in as_list(item[S.ANSWERS])]
        answerable = bool(item[S.ANSWERABLE])
        rows[S.MODEL].append(method)
        rows[S.DATASET].append(item[S.DATASET])
        rows[S.ID].append(item[S.ID])
        rows[S.RESPONSE].append(response)
        rows[S.CORRECT].append(
            answerable and grade(response, answers, item[S.METRIC], choices, correct_at=correct_at)
        )
        rows[S.REFUSED].append(is_refusal_response(response, choices))
    return pd.DataFrame(rows, columns=S.PREDICTIONS.names).sort_values(S.ID, ignore_index=True)


# --- selection, fingerprints and shards -------------------------------------------------------------


def eval_items(items_uri: str, datasets: Sequence[str] | None = None) -> pa.Table:
    """Text columns of the evaluation items: the named data sets, or every set in an evaluation split."""
    text = dio.read_table(items_uri, columns=TEXT_COLUMNS)
    if datasets:
        unknown = sorted(set(datasets) - set(text[S.DATASET].to_pylist()))
        if unknown:
            raise ValueError(f"evaluation data set(s) not in items: {unknown}")
        return text.filter(pc.is_in(text[S.DATASET], pa.array(list(datasets))))
    return text.filter(pc.is_in(text[S.SPLIT], pa.array(list(EVAL_SPLITS))))


def method_instruction(method: str, eval_cfg: EvalConfig) -> str | None:
    """The refusal-prompt baseline asks the base model to refuse when unsure; nothing else changes."""
    text = eval_cfg.refusal_instruction if method == REFUSAL_PROMPT else eval_cfg.answer_instruction
    return text or None


def checkpoint_stamp(path: str) -> list[tuple[str, int, int]]:
    """Names, sizes and mtimes of a checkpoint's files: retraining changes them, reading does not."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    stamp = []
    for f in sorted(root.rglob("*")):
        if f.is_file():
            st = f.stat()
            stamp.append((str(f.relative_to(root)), st.st_size, st.st_mtime_ns))
    return stamp


def fingerprint(model_dir: str, ids: Sequence[str], **settings: Any) -> str:
    """Content hash of everything a shard depends on; equal hash -> the shard can be reused."""
    blob = {
        "model": os.path.abspath(model_dir),
        "files": checkpoint_stamp(model_dir),
        "ids": hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest(),
        **settings,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def shard_uri(folder: str, dataset: str) -> str:
    return dio.join(folder, f"{dataset}.parquet")


def _stamp_uri(folder: str, dataset: str) -> str:
    # A leading underscore hides the stamp from Parquet discovery when the folder is read as a table.
    return dio.join(folder, f"_{dataset}.json")


def shard_is_current(folder: str, dataset: str, fp: str) -> bool:
    stamp = _stamp_uri(folder, dataset)
    if not (dio.exists(stamp) and dio.exists(shard_uri(folder, dataset))):
        return False
    return json.loads(dio.read_bytes(stamp).decode()).get("fingerprint") == fp


def write_shard(table: pa.Table, folder: str, dataset: str, fp: str) -> None:
    """Shard first, stamp last: a crash in between leaves a shard that a rerun recomputes."""
    dio.write_table(table, shard_uri(folder, dataset))
    fs, path = dio.resolve(_stamp_uri(folder, dataset))
    with fs.open_output_stream(path) as out:
        out.write(json.dumps({"fingerprint": fp, "rows": table.num_rows}).encode())


# --- the stage ---------------------------------------------------------------------------------------


@dataclass
class MethodPlan:
    """One method's work: its loadable checkpoint, prompt, shard folder and the sets still to answer."""

    method: str
    model_dir: str
    decoding: Decoding
    folder: str
    fingerprints: dict[str, str] = field(default_factory=dict)
    todo: list[str] = field(default_factory=list)


def predictions_dir(run_dir: str, method: str) -> str:
    return dio.join(run_dir, EVAL_DIR, "predictions", method)


def subset_of(source: Dataset, datasets: Sequence[str]) -> Dataset:
    """Rows of some data sets, materialised before the actors start (see `read_inputs`)."""
    from ray.data.expressions import col

    return source.filter(expr=col(S.DATASET).is_in(list(datasets))).materialize()


def score_line(dataset: str, graded: pd.DataFrame) -> str:
    scores = metrics_table(graded).iloc[0]
    return (
        f"{dataset:<28} n={len(graded):<5} acc={scores[S.ACC]:6.1%} refr={scores[S.REFR]:6.1%} "
        f"s_trust={100 * scores[S.S_TRUST]:+7.2f}"
    )


@dataclass
class EvalResult:
    predictions_uri: str
    metrics_uri: str
    metrics: pd.DataFrame
    computed: list[tuple[str, str]] = field(default_factory=list)
    reused: list[tuple[str, str]] = field(default_factory=list)

    def summary_line(self) -> str:
        return (
            f"evaluate: {len(self.metrics)} (method, data set) cells, {len(self.computed)} computed, "
            f"{len(self.reused)} reused -> {self.metrics_uri}"
        )


def run_evaluation(
    cfg: Config,
    run_dir: str,
    models: Mapping[str, str],
    items_uri: str,
    datasets: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> EvalResult:
    """Evaluate each method's checkpoint on each evaluation set (Ray must be initialised).

    `models`: method name -> HF checkpoint (or adapter) directory; `refusal_prompt` maps to the base
    checkpoint. `datasets`: set names (default: `cfg.eval.datasets`, else every set whose split is an
    evaluation split).
    """
    run_dir = dio.absolute(run_dir)
    text = eval_items(items_uri, datasets or cfg.eval.datasets or None)
    if text.num_rows == 0:
        raise ValueError(f"no evaluation items in {items_uri} (splits {EVAL_SPLITS})")
    text_df = text.to_pandas()
    ids_by_set = {d: g[S.ID].tolist() for d, g in text_df.groupby(S.DATASET, sort=True)}
    result = EvalResult(dio.join(run_dir, PREDICTIONS_FILE), dio.join(run_dir, METRICS_FILE), pd.DataFrame())
    base_dir = models.get("base")
    plans: list[MethodPlan] = []
    for method, path in models.items():
        model_dir = resolve_checkpoint(path, dio.join(run_dir, EVAL_DIR, "merged", method), base_dir)
        decoding = Decoding(method_instruction(method, cfg.eval), cfg.eval.max_new_tokens)
        settings = {**asdict(decoding), "engine": cfg.sampling.engine, "dtype": cfg.model.dtype,
                    "correct_at": cfg.grading.vqa_correct_at}  # fmt: skip
        plan = MethodPlan(method, model_dir, decoding, predictions_dir(run_dir, method))
        plan.fingerprints = {d: fingerprint(model_dir, ids, **settings) for d, ids in ids_by_set.items()}
        plan.todo = [d for d in ids_by_set if not shard_is_current(plan.folder, d, plan.fingerprints[d])]
        result.reused += [(method, d) for d in ids_by_set if d not in plan.todo]
        plans.append(plan)
    needed = sorted({d for plan in plans for d in plan.todo})
    if needed:
        n_rows = sum(len(ids_by_set[d]) for d in needed)
        blocks = max(cfg.sampling.num_actors, -(-n_rows // cfg.eval.batch_size))
        source = read_inputs(items_uri, [i for d in needed for i in ids_by_set[d]], blocks)
    for plan in plans:
        if not plan.todo:
            log(f"  {plan.method}: all {len(ids_by_set)} set(s) up to date")
            continue
        log(f"  {plan.method}: answering {', '.join(plan.todo)} with {plan.model_dir}")
        subset = source if plan.todo == needed else subset_of(source, plan.todo)
        stream = stream_responses(
            subset, {d: len(ids_by_set[d]) for d in plan.todo}, plan.model_dir, cfg.sampling, plan.decoding,
            batch_size=cfg.eval.batch_size, dtype=cfg.model.dtype,
        )  # fmt: skip
        for dataset, responses in stream:
            graded = grade_predictions(text_df, responses, plan.method, cfg.grading.vqa_correct_at)
            table = S.conform(
                pa.Table.from_pandas(graded, preserve_index=False), S.PREDICTIONS, "predictions"
            )
            write_shard(table, plan.folder, dataset, plan.fingerprints[dataset])
            result.computed.append((plan.method, dataset))
            log("    " + score_line(dataset, graded))
    shards = [shard_uri(plan.folder, d) for plan in plans for d in ids_by_set]
    predictions = pa.concat_tables([S.conform(dio.read_table(u), S.PREDICTIONS, u) for u in shards])
    dio.write_table(predictions, result.predictions_uri)
    result.metrics = metrics_table(predictions.to_pandas())
    metrics = pa.Table.from_pandas(result.metrics, preserve_index=False)
    dio.write_table(S.conform(metrics, S.METRICS_TABLE, "metrics"), result.metrics_uri)
    return result
