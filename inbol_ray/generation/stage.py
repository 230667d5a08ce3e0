"""The one generate-over-items stage: `items` -> graded responses in shards (+ quarantine).

Confidence sampling (K samples at temperature T -> `samples`), the evaluation (greedy answers, optional
instruction -> `predictions`) and the base model's test-set confidence are this stage with a different
`Decoding` and output kind. One streaming Ray Data pipeline, three stages by where they run:
1. CPU tasks: read a slice of `items` (see `shards.read_units`), keep the selected rows of unfinished
   shards, load and fully decode each image (`data.images.check_images`: the prepare stage's rules, so a
   path that went missing since or a size limit lowered since is caught here), reject empty questions.
   Bad rows get a `reason` and skip generation.
2. Actor pool (`GenerateActor`; `sampling.num_actors` actors with `cpus_per_actor` / `gpus_per_actor`):
   the responses of each good row, seeded per item.
3. CPU tasks: grading (`generation.grade`).
The driver collects the rows per shard and writes each finished shard (`shards.ShardCollector`); at the
end the quarantine file is rebuilt from every shard's manifest and `items = done + quarantined` is
checked. Ray Data restarts an actor that dies and retries its batch; the collector keeps one row per id.
Outputs depend on (seed, item id, model, decoding), never on actor count, batch size or shard size.

`run_generations` runs several jobs over the same items in one pass (the evaluation: one job per method):
rows carry a `job` column, the actors switch models between jobs, the driver routes each job's rows to its
own shards. A job's outputs are the same whether it runs alone or shares a pass.

Resources: the light stages request 0 CPUs, on purpose. On a small machine the actor pool may hold every
CPU (2 actors x 1 CPU on 2 cores), and a light task asking for even 0.1 CPU would then wait forever; the
light stages' concurrency is capped by their task pools instead. For the same reason the input is built
from read units rather than `ray.data.read_parquet`, whose file-listing task needs a whole CPU.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from inbol_ray import checkpoint, progress
from inbol_ray.config import Config, SamplingConfig
from inbol_ray.data import io as dio
from inbol_ray.generation.actor import JOB, Decoding, GenerateActor
from inbol_ray.generation.checks import check_units
from inbol_ray.generation.grade import OUTPUT_SCHEMAS, grade_rows
from inbol_ray.generation.shards import (  # noqa: F401  (Selection: re-exported for stage users)
    Plan,
    Selection,
    ShardCollector,
    finished_shards,
    make_plan,
    read_units,
    scan_items,
    write_quarantine,
)
from inbol_ray.refusal import REFUSAL_DETECTOR_VERSION
from inbol_ray.schema import ID, REASON

SHARD_ROWS = 1024
"""Default items per shard: a crash loses at most the shards in flight; few enough files at scale."""
EXIT_ONCE_ENV = "INBOL_SAMPLER_EXIT_ONCE"
"""Test hook: a marker path; the first actor call that finds it missing creates it and kills its actor."""
MIN_LIGHT_TASKS, MAX_LIGHT_TASKS = 2, 64
"""Bounds on concurrent read/check and grade tasks (see `light_tasks`)."""


def light_tasks() -> int:
    """Concurrent read/check and grade tasks: one per CPU the cluster has (2 on a 2-core machine, 64 on
    eight 8-CPU sampling nodes), so image decoding and grading keep up with as many actors as the cluster
    runs; they request 0 CPUs (see the module docstring), so this count is their only limit."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", MIN_LIGHT_TASKS))
    return max(MIN_LIGHT_TASKS, min(MAX_LIGHT_TASKS, cpus))


GRADE_BATCHES = 4
"""Actor batches per grading task: one task per actor batch cost ~20 s of 60 in a 3000-answer pass here."""


def actor_options(sc: SamplingConfig) -> dict[str, Any]:
    """What one generating actor reserves: the sampler and evaluator actors here, and Serve's model
    replicas (serve/app.py), which hold the same engine. Keys as Ray's actor options take them."""
    options: dict[str, Any] = {"num_cpus": sc.cpus_per_actor}
    if sc.gpus_per_actor:
        options["num_gpus"] = sc.gpus_per_actor
    if sc.accelerator_type:
        options["accelerator_type"] = sc.accelerator_type
    return options


@dataclass(frozen=True)
class Job:
    """One generation over items: what to read, which model, how to decode, what to write where."""

    stage: str
    """Name in logs and in the quarantine table (`sample`, `evaluate_<method>`, `base_confidence`)."""
    items_uri: str
    out_uri: str
    quarantine_uri: str
    model_dir: str
    decoding: Decoding
    output: str
    """`samples` or `predictions` (generation.grade)."""
    selection: Selection = Selection()
    method: str = ""
    """The `model` column of predictions."""
    shard_rows: int = SHARD_ROWS
    batch_size: int = 0
    """Items per actor call (0: `sampling.batch_size`); changes speed, never an output."""


@dataclass
class GenerationResult:
    stage: str
    out_uri: str
    quarantine_uri: str
    engine: str
    k: int
    items: int
    """Input rows selected; always equals done + quarantined."""
    done: int
    quarantined: int
    shards: int
    shards_reused: int
    """Shards finished by an earlier run and not redone."""
    seconds: float
    new_outputs: int
    """Responses generated by this run (K per item done now)."""
    first_batch_s: float = 0.0
    """Seconds until the first graded rows reached the driver: planning, actor start and model load."""
    first_batch_rows: int = 0
    duplicates_dropped: int = 0
    datasets: list[str] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    """Quarantine reasons (text before the first colon) and how many rows had each."""
    pass_jobs: int = 1
    """Jobs that shared this job's Ray Data pass (run_generations): `seconds` is the whole pass's."""
    pass_outputs: int = 0
    """Responses the whole pass generated (all its jobs); 0 when the job ran alone."""

    @property
    def per_s(self) -> float:
        """Responses per second of the pass this job ran in: a job sharing a pass has no time of its own."""
        total = self.pass_outputs if self.pass_jobs > 1 else self.new_outputs
        return total / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_per_s(self) -> float:
        """Responses per second after the first batch arrived: the stage's rate with start-up excluded
        (rows of several jobs sharing a pass count for the job they belong to, so single-job runs only)."""
        rest = self.seconds - self.first_batch_s
        if rest <= 0 or not self.first_batch_rows:
            return 0.0
        return (self.new_outputs - self.first_batch_rows * self.k) / rest

    def summary_line(self) -> str:
        if self.pass_jobs > 1:
            rate = (
                f"{self.new_outputs} new, in one pass of {self.pass_jobs} jobs "
                f"({self.pass_outputs} responses in {self.seconds:.1f}s, {self.per_s:.1f}/s)"
            )
        else:
            rate = f"{self.per_s:.1f} responses/s ({self.new_outputs} new in {self.seconds:.1f}s)"
        return (
            f"{self.stage}[{self.engine}]: items {self.items}, done {self.done} x K={self.k}, {rate}, "
            f"quarantined {self.quarantined}, shards {self.shards} ({self.shards_reused} reused)"
        )

    @property
    def counts(self) -> dict[str, Any]:
        """Plain data for the pipeline's stage manifest."""
        return asdict(self) | {"responses_per_s": round(self.per_s, 2)}


# --- the stage -----------------------------------------------------------------------------------------


def depends_on(cfg: Config, job: Job) -> dict[str, Any]:
    """What every output of `job` is a function of (the plan hash); batch sizes and actor counts are not."""
    from inbol_ray.model.generation import (  # fixed batch shapes: numerics
        GREEDY_ROWS_PER_FORWARD,
        PAD_MULTIPLE,
        ROWS_PER_FORWARD,
    )

    return {
        "stage": job.output,
        "method": job.method,
        "decoding": job.decoding,
        "prompt": cfg.prompt,
        "engine": [
            cfg.sampling.engine,
            cfg.sampling.max_model_len,
            PAD_MULTIPLE,
            ROWS_PER_FORWARD,
            GREEDY_ROWS_PER_FORWARD,
        ],
        "model": [checkpoint.model_location(job.model_dir), checkpoint.stamp(job.model_dir)],
        "dtype": cfg.model.dtype,
        # `crop` is how every image was shaped before the setting existed: left out, so shards made then
        # are still reused; `pad` shows the model other pixels.
        **({"image_aspect": cfg.model.image_aspect} if cfg.model.image_aspect != "crop" else {}),
        "grading": [cfg.grading, REFUSAL_DETECTOR_VERSION],
        "limits": [cfg.data.max_image_bytes, cfg.data.max_image_pixels],
        "selection": job.selection,
    }


def run_generation(
    cfg: Config, job: Job, *, log: Callable[[str], None] = print, exit_once_marker: str | None = None
) -> GenerationResult:
    """Generate, grade and write `job`'s output for the selected items (Ray must be initialised).

    Finished shards of an earlier run with the same plan are kept; everything else is (re)done.
    `exit_once_marker` (default: env INBOL_SAMPLER_EXIT_ONCE) is the fault-injection hook of `GenerateActor`.
    """
    return run_generations(cfg, [job], log=log, exit_once_marker=exit_once_marker)[0]


@dataclass
class _Pending:
    """One job's share of a pass: its plan, what an earlier run finished, and where its rows go."""

    job: Job
    plan: Plan
    done: dict[int, dict[str, Any]]
    pending: list[int]
    collector: ShardCollector


def _shared(jobs: list[Job]) -> None:
    """Jobs of one pass read the same rows in the same batches into the same kind of output."""
    if not jobs:
        raise ValueError("run_generations needs at least one job")
    first = jobs[0]
    for job in jobs[1:]:
        for name in ("items_uri", "selection", "output", "shard_rows", "batch_size"):
            if getattr(job, name) != getattr(first, name):
                raise ValueError(
                    f"jobs {first.stage} and {job.stage} differ in {name}: they need separate passes"
                )
    outs = [job.out_uri for job in jobs]
    if len(set(outs)) != len(outs):
        raise ValueError(f"jobs of one pass write to the same folder: {outs}")


def run_generations(
    cfg: Config, jobs: list[Job], *, log: Callable[[str], None] = print, exit_once_marker: str | None = None
) -> list[GenerationResult]:
    """Several jobs over the same items (e.g. every method of an evaluation) in one Ray Data pass.

    One actor pool serves them all, loading each job's model in turn (`GenerateActor`): the pool, its
    processes and imports are paid once, not once per job. Each job keeps its own plan, shards, resume and
    quarantine, exactly as if it ran alone, so outputs do not depend on which jobs share a pass.
    """
    import ray

    t0 = time.perf_counter()
    light = light_tasks()
    _shared(jobs)
    first = jobs[0]
    keys = scan_items(first.items_uri, first.selection)
    selected = [(item_id, ds) for rg in keys for _, item_id, ds in rg.selected]
    ids = [item_id for item_id, _ in selected]
    sc = replace(cfg.sampling, batch_size=first.batch_size or cfg.sampling.batch_size)
    parts = []
    for job in jobs:
        plan = make_plan(ids, job.shard_rows, **depends_on(cfg, job))
        done = finished_shards(job.out_uri, plan)
        pending = sorted(set(plan.expected) - set(done))
        if done:
            log(
                f"{job.stage}: {len(done)}/{len(plan.expected)} shards finished by an earlier run, {len(pending)} to do"
            )
        collector = ShardCollector(job.out_uri, plan, pending, OUTPUT_SCHEMAS[job.output], job.decoding.k)
        parts.append(_Pending(job, plan, done, pending, collector))
    n_shards = parts[0].plan.n_shards  # same ids and shard size: every job shards alike
    # Job by job, so each actor meets each model about once (see GenerateActor).
    units = [
        {**unit, JOB: j}
        for j, part in enumerate(parts)
        for unit in read_units(keys, n_shards, set(part.pending), sc.batch_size)
    ]
    # No more actors than batches: each one costs a process, imports and a model load (~10 s on 2 cores),
    # and outputs do not depend on the actor count.
    batches = sum(-(-sum(p.plan.expected[s] for s in p.pending) // sc.batch_size) for p in parts)
    actors = max(1, min(sc.num_actors, batches))
    first_batch: tuple[float, int] | None = None
    if units:
        marker = os.environ.get(EXIT_ONCE_ENV, "") if exit_once_marker is None else exit_once_marker
        ds = (
            ray.data.from_items(units, override_num_blocks=len(units))
            .map_batches(
                check_units,
                batch_format="pyarrow",
                batch_size=1,
                num_cpus=0,
                compute=ray.data.TaskPoolStrategy(size=min(light, len(units))),
                fn_kwargs={
                    "selection": first.selection,
                    "n_shards": n_shards,
                    "pending": [p.pending for p in parts],
                    "refusal": [p.job.decoding.refusal for p in parts],
                    "prompt": cfg.prompt,
                    "max_bytes": cfg.data.max_image_bytes,
                    "max_pixels": cfg.data.max_image_pixels,
                },
            )
            .map_batches(
                GenerateActor,
                batch_format="pyarrow",
                batch_size=sc.batch_size,
                compute=ray.data.ActorPoolStrategy(size=actors),
                **actor_options(sc),
                fn_constructor_kwargs={
                    "model_dirs": [job.model_dir for job in jobs],
                    "sampling": sc,
                    "decodings": [job.decoding for job in jobs],
                    "dtype": cfg.model.dtype,
                    "image_aspect": cfg.model.image_aspect,
                    "system": cfg.prompt.system,
                    "exit_once_marker": marker,
                },
            )
            .map_batches(
                grade_rows,
                batch_format="pyarrow",
                batch_size=GRADE_BATCHES * sc.batch_size,
                num_cpus=0,
                compute=ray.data.TaskPoolStrategy(size=light),
                fn_kwargs={
                    "output": first.output,
                    "grading": cfg.grading,
                    "methods": [j.method for j in jobs],
                },
            )
        )
        todo = sum(p.plan.expected[s] for p in parts for s in p.pending)
        with progress.bar(_pass_label(jobs), todo, unit="items") as bar:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                if first_batch is None:  # start-up (planning, actor start, model load) ends here
                    first_batch = (time.perf_counter() - t0, batch.num_rows)
                for j in sorted(set(batch[JOB].to_pylist())):
                    parts[j].collector.add(batch.filter(pc.equal(batch[JOB], j)))
                bar.advance(batch.num_rows)
    seconds = time.perf_counter() - t0
    results = [_finish(part, ids, selected, cfg.sampling.engine, seconds, first_batch) for part in parts]
    if len(results) > 1:
        total = sum(r.new_outputs for r in results)
        results = [replace(r, pass_jobs=len(results), pass_outputs=total) for r in results]
    return results


def _pass_label(jobs: list[Job]) -> str:
    """The progress bar's name: the job's stage, or for a shared pass its kind and model count
    (`evaluate_base`, `evaluate_sft`, ... -> `evaluate (2 models)`)."""
    if len(jobs) == 1:
        return jobs[0].stage
    return f"{jobs[0].stage.split('_')[0]} ({len(jobs)} models)"


def _finish(
    part: _Pending,
    ids: list[str],
    selected: list[tuple[str, str]],
    engine: str,
    seconds: float,
    first_batch: tuple[float, int] | None = None,
) -> GenerationResult:
    """Check that every row of the job arrived, write its quarantine, count."""
    job, collector = part.job, part.collector
    missing = collector.missing()
    if missing:
        raise RuntimeError(f"{job.stage}: shards incomplete after the run (rows lost?): {missing}")
    shards = {**part.done, **collector.written}
    bad = [row for body in shards.values() for row in body["quarantine"]]
    write_quarantine(bad, job.quarantine_uri, job.stage)
    n_done = sum(body["done"] for body in shards.values())
    if n_done + len(bad) != len(ids):
        raise RuntimeError(f"{job.stage}: items {len(ids)} != done {n_done} + quarantined {len(bad)}")
    return GenerationResult(
        stage=job.stage,
        out_uri=job.out_uri,
        quarantine_uri=job.quarantine_uri,
        engine=engine,
        k=job.decoding.k,
        items=len(ids),
        done=n_done,
        quarantined=len(bad),
        shards=len(shards),
        shards_reused=len(part.done),
        seconds=seconds,
        new_outputs=sum(body["new_outputs"] for body in collector.written.values()),
        first_batch_s=first_batch[0] if first_batch else 0.0,
        first_batch_rows=first_batch[1] if first_batch else 0,
        duplicates_dropped=collector.duplicates,
        datasets=sorted({ds for _, ds in selected}),
        reasons=dict(Counter(row[REASON].split(":")[0] for row in bad)),
    )


def read_output(result: GenerationResult, columns: list[str] | None = None) -> pa.Table:
    """The stage's output table (every shard), sorted by id."""
    table = dio.read_table(result.out_uri, columns=columns)
    return table.sort_by(ID)
