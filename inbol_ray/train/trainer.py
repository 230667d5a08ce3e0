"""Driver side of training: build the Ray Train `TorchTrainer`, run it, export the trained model.

    run_training(cfg, method, layout) -> TrainResult
    run_reference_pass(cfg, layout) -> counts   (see reference.py)

Where things are comes from the run layout and the method table: `method` trains on
`layout.training_table(method)` starting from `layout.start_model(method)` and writes `layout.model(method)`:
    config.json, model.safetensors, processor files   merged llava-hf checkpoint (train.merge, or full FT)
    adapter/                                            peft adapter (LoRA)
    metrics.jsonl                                       one row per step (loss, per-group loss, margins, ...)
    train_result.json                                   the TrainResult below
    ray/<run name>/checkpoint_*                         Ray Train checkpoints (trainable tensors + optimizer)
    tensorboard/                                        when train.tensorboard
Every location is a URI string (a local path or `s3://...`): Ray Train gets the pyarrow filesystem of
`layout.train_storage(method)`, the model is exported to a local temporary folder and uploaded (written in
place when the run is local), and the small files go through pyarrow too.

Resuming: the Ray run name is `<method>-<fingerprint of the train config, table and start model>`, so
rerunning the same training finds its checkpoints and continues (Ray Train restores the latest one), while a
changed config starts a fresh run next to it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from inbol_ray import methods as M
from inbol_ray import progress
from inbol_ray import schema as S
from inbol_ray.checkpoint import ADAPTER_SUBDIR
from inbol_ray.config import Config, ModelConfig, TrainConfig
from inbol_ray.config.sections import check_training_precision
from inbol_ray.data import io as dio
from inbol_ray.manifest import fingerprint
from inbol_ray.run_layout import RunLayout
from inbol_ray.runtime import RAY_TRAIN_POLL
from inbol_ray.tracking import Tracking
from inbol_ray.train.loop import LoopSpec, train_loop_per_worker
from inbol_ray.train.loop_checkpoint import STATE_FILE, latest_local
from inbol_ray.train.objectives import objective_for
from inbol_ray.train.reference import empty_table_error, run_reference_pass
from inbol_ray.train.schedule import master_dtype, method_lr
from inbol_ray.train.step_metrics import write_jsonl


@dataclass
class TrainResult:
    method: str
    checkpoint_dir: str | None
    """Merged HF model location (from_pretrained / vLLM); None for LoRA with train.merge=false."""
    adapter_dir: str | None
    """peft adapter location (LoRA only)."""
    train_checkpoint: str
    """The last Ray Train checkpoint (trainable tensors, optimizer state, history)."""
    steps: int
    final_metrics: dict[str, Any]
    metrics_uri: str
    seconds: float
    resumed_from: list[int] = field(default_factory=list)
    """Steps at which the run resumed from a checkpoint (after worker failures or a rerun)."""
    probe: dict[str, Any] = field(default_factory=dict)
    """Per-response log-probs of the first table rows, computed by the trained policy in the workers."""

    def summary_line(self) -> str:
        loss = self.final_metrics.get("loss", float("nan"))
        return f"{self.method}: {self.steps} steps, final loss {loss:.4f}, {self.seconds:.0f}s -> {self.checkpoint_dir or self.adapter_dir}"


def run_name(
    train: TrainConfig, model: ModelConfig, table_uri: str, start_model: str, system: str = ""
) -> str:
    # `crop` shaped every image before `model.image_aspect` existed: left out, so those runs resume; the
    # same for an empty system line (the table's prompts are the user turn only, so it is named here).
    aspect = {"image_aspect": model.image_aspect} if model.image_aspect != "crop" else {}
    aspect.update({"system": system} if system else {})
    digest = fingerprint(train, dtype=model.dtype, table=table_uri, base=start_model, **aspect)
    return f"{train.method}-{digest[:10]}"


def local_checkpoint_dir(storage: str, name: str) -> str:
    """Local mode's own checkpoint folder: inside the Ray storage when that is local, else a local cache
    keyed by the storage URI (a local-mode run on object storage resumes on the same machine only)."""
    fs, path = dio.resolve(storage)
    if isinstance(fs, pafs.LocalFileSystem):
        return os.path.join(path, name)
    return os.path.join(tempfile.gettempdir(), "inbol-train", fingerprint(storage)[:16], name)


def _columns(table_uri: str) -> set[str]:
    import pyarrow.parquet as pq

    fs, path = dio.resolve(table_uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory and not dio.list_files(table_uri, ".parquet"):
        return set()  # only hidden files: a reference pass that did not finish
    return set(pq.ParquetDataset(path, filesystem=fs).schema.names)


def needs_reference(method: str, layout: RunLayout) -> bool:
    """True for a DPO method whose reference table is missing or lacks ref_logp_* (run_reference_pass)."""
    if not M.method(method).needs_reference:
        return False
    table = layout.training_table(method)
    return not dio.exists(table) or not set(S.REF_LOGP.values()) <= _columns(table)


def _check_table(table_uri: str, method: str) -> None:
    """Fail in the driver, before any worker starts, when the table cannot feed this method.

    Rows too, not only columns: an empty table otherwise fails inside every worker, after
    `train.max_failures` retries. The count comes from the Parquet footers (`dio.row_count`), not a read.
    """
    if not dio.exists(table_uri):
        raise FileNotFoundError(f"{method}: training table {table_uri} not found")
    names = _columns(table_uri)
    dpo = M.method(method).objective == "dpo"
    expected = S.CADPO_PAIRS_WITH_REF if dpo else S.SFT
    missing = [c for c in expected.names if c not in names]
    if missing:
        hint = " (run run_reference_pass first)" if set(missing) <= set(S.REF_LOGP.values()) else ""
        raise ValueError(f"{method}: table {table_uri} lacks column(s) {missing}{hint}")
    if dio.row_count(table_uri) == 0:
        raise empty_table_error(table_uri, method, str(M.method(method).table))


def worker_resources(train: TrainConfig) -> dict[str, float]:
    """What one Ray Train worker reserves (its GPU type is ScalingConfig's `accelerator_type`)."""
    return {"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})}


def _trainer(spec: LoopSpec, storage: str, name: str):
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = spec.train
    scaling = (
        ray.train.ScalingConfig(num_workers=0)
        if cfg.num_workers == 0
        else ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=worker_resources(cfg),
            accelerator_type=cfg.accelerator_type or None,
        )
    )
    fs, storage_path = dio.resolve(storage)
    # The jobs set it when they start Ray (runtime.quiet_env); here for callers who started Ray themselves.
    os.environ.setdefault(*RAY_TRAIN_POLL)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # Ray Train's INFO lines ("Checkpoint successfully created", worker-group start) off the console;
            # the loop prints its own progress, and Ray Train's system log files under the Ray session
            # still hold every level. (Its per-report line is not under `ray.train`: loop._quiet_report_log.)
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        # No Ray Data dataset: each worker reads its steps' rows from the table's files, a pool of row groups
        # at a time, by a seeded schedule (loop.py, table_rows.py). The driver never reads the table, a
        # worker never holds it, and each step's rows are the same whatever the worker count.
    )


def run_training(
    cfg: Config,
    method: str,
    layout: RunLayout,
    *,
    log: Callable[[str], None] = print,
    fail_after_step: int = 0,
    tracking: Tracking | None = None,
) -> TrainResult:
    """Train `method` on its table of `layout`, from its start model; write `layout.model(method)`.

    cfg.train.num_workers = 0 runs the loop in this process (Ray Train local mode, for debugging), otherwise
    on that many Ray Train workers (DDP, or FSDP with train.strategy=fsdp). Ray must be initialised.
    `fail_after_step` is a test hook: one worker raises once after that step. `tracking` (the pipeline's):
    a child run for this training, its steps logged by the loop's rank 0, its files added at the end.
    """
    import ray

    objective_for(method)  # a clear error for an unknown or untrained method
    check_training_precision(cfg.model.dtype, cfg.train)  # again: cfg may have changed since it loaded
    if not ray.is_initialized():
        raise RuntimeError("run_training needs a running Ray (inbol_ray.runtime.init_ray)")
    t0 = time.time()
    table_uri, start_model = layout.training_table(method), layout.start_model(method)
    out, storage = layout.model(method), layout.train_storage(method)
    _check_table(table_uri, method)
    train = dataclasses.replace(cfg.train, method=method, lr=method_lr(cfg.train, method))
    name = run_name(train, cfg.model, table_uri, start_model, cfg.prompt.system)
    tracking = tracking or Tracking()  # none: off
    tracked = tracking.start_method(method, _tracked_params(train, name, table_uri, start_model))
    spec = LoopSpec(
        train=train,
        method=method,
        base_model_dir=start_model,
        table_uri=table_uri,
        model_dtype=cfg.model.dtype,
        image_aspect=cfg.model.image_aspect,
        system=cfg.prompt.system,
        local_checkpoint_dir=local_checkpoint_dir(storage, name) if train.num_workers == 0 else "",
        tensorboard_dir=dio.join(out, "tensorboard") if train.tensorboard else "",
        fail_after_step=fail_after_step,
        fault_marker=dio.join(storage, name, "fault_injected") if fail_after_step else "",
        progress_file=progress.file_for(layout.root, f"train_{method}"),
        tracking=tracked,
    )
    mode = (
        "local mode (in the driver)"
        if train.num_workers == 0
        else (f"{train.num_workers} Ray Train workers, {train.strategy}, {'GPU' if train.use_gpu else 'CPU'}")
    )
    log(f"[train {method}] {mode}; table {table_uri}; from {start_model}; run {dio.join(storage, name)}")
    with progress.follow(spec.progress_file, f"train {method}"):
        result = _trainer(spec, storage, name).fit()
    checkpoint, checkpoint_uri = result.checkpoint, ""
    if checkpoint is None:  # local mode rerun of a finished run: nothing was reported this time
        from ray.train import Checkpoint

        latest = latest_local(spec.local_checkpoint_dir)
        if latest is None:
            raise RuntimeError(f"training {method} produced no checkpoint")
        checkpoint = Checkpoint.from_directory(str(latest))
    elif train.num_workers > 0 and dio.is_uri(storage):
        checkpoint_uri = f"{storage.split('://', 1)[0]}://{checkpoint.path}"
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, STATE_FILE)) as f:
            state = json.load(f)
        model_dir, adapter_dir = _export(train, cfg.model.dtype, start_model, directory, out, name)
    metrics_uri = dio.join(out, "metrics.jsonl")
    write_jsonl(state["history"], metrics_uri)
    final = {k: v for k, v in state["history"][-1].items() if k != "ids"} if state["history"] else {}
    res = TrainResult(
        method=method,
        checkpoint_dir=model_dir,
        adapter_dir=adapter_dir,
        train_checkpoint=checkpoint_uri or checkpoint.path,
        steps=state["step"],
        final_metrics=final,
        metrics_uri=metrics_uri,
        seconds=time.time() - t0,
        resumed_from=state["resumes"],
        probe=state.get("probe", {}),
    )
    dio.write_bytes(
        dio.join(out, "train_result.json"),
        json.dumps(dataclasses.asdict(res), indent=1, default=str).encode(),
    )
    log(f"[train {method}] " + res.summary_line())
    files = {"metrics.jsonl": metrics_uri, "train_result.json": dio.join(out, "train_result.json")}
    tracking.end_method(method, files)
    return res


def _tracked_params(train: TrainConfig, ray_run: str, table_uri: str, start_model: str) -> dict[str, Any]:
    """A training run's parameters: the train section as this method trains (its own lr), and what the
    Ray Train run name fingerprints, so a tracked run can be matched to its checkpoints."""
    from inbol_ray.tracking.params import flatten

    return {**flatten({"train": train}), "ray_run": ray_run, "table": table_uri, "start_model": start_model}


def _export(
    train: TrainConfig, dtype: str, start_model: str, checkpoint_dir: str, out: str, run: str = ""
) -> tuple[str | None, str | None]:
    """Rebuild the policy from the start model and the checkpoint's trainable tensors and publish it as
    `out`'s new export (`checkpoint.publish_export`: a fresh folder swapped in whole, so no file of an
    earlier training of this method stays beside it); return the merged model's and adapter's URIs."""
    from inbol_ray.checkpoint import load_processor, publish_export, resolve
    from inbol_ray.train.lora import export_model, load_policy, load_trainable_state, read_trainable

    policy = load_policy(start_model, dtype, train)  # float32 master weights when the loop had them
    cast = dtype if master_dtype(train, dtype) != dtype else None  # back to model.dtype for the export
    load_trainable_state(policy, read_trainable(checkpoint_dir))
    processor = load_processor(start_model)
    written: dict[str, bool] = {}

    def write(local: str) -> None:
        model_dir, adapter_dir = export_model(
            policy, processor, local, train.merge, dtype=cast, base=resolve(start_model).model_dir
        )
        written.update(model=model_dir is not None, adapter=adapter_dir is not None)

    about = {"train_run": run, "start_model": start_model, "lora": train.lora, "merge": train.merge}
    target = publish_export(out, write, about=about)
    return (target if written["model"] else None), (
        dio.join(target, ADAPTER_SUBDIR) if written["adapter"] else None
    )


__all__ = [
    "TrainResult",
    "needs_reference",
    "run_name",
    "run_reference_pass",
    "run_training",
]
