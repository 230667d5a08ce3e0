"""Driver side of training: build the Ray Train `TorchTrainer`, run it, export the trained model.

    run_training(cfg, method, table_uri, base_model_dir, out_dir) -> TrainResult
    run_reference_pass(cfg, pairs_uri, base_model_dir, out_uri) -> counts   (see reference.py)

Outputs under `out_dir` (the pipeline passes `<run_dir>/models/<method>`):
    config.json, model.safetensors, processor files   merged HF checkpoint (train.merge, or full fine-tuning)
    adapter/                                            peft adapter (LoRA)
    metrics.jsonl                                       one row per step (loss, per-group loss, margins, ...)
    train_result.json                                   the TrainResult below
    ray/<run name>/checkpoint_*                         Ray Train checkpoints (trainable tensors + optimizer)
    tensorboard/                                        when train.tensorboard

Resuming: the Ray run name is `<method>-<hash of the train config, table and base model>`, so rerunning the
same training with the same out_dir finds its checkpoints and continues (Ray Train restores the latest one),
while a changed config starts a fresh run next to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inbol_ray import schema as S
from inbol_ray.config import Config, ModelConfig, TrainConfig
from inbol_ray.data import io as dio
from inbol_ray.train.data import DPO_KINDS
from inbol_ray.train.loop import DATASET, STATE_FILE, LoopSpec, train_loop_per_worker
from inbol_ray.train.objectives import OBJECTIVES
from inbol_ray.train.reference import run_reference_pass
from inbol_ray.train.step_metrics import write_jsonl

METHOD_TABLES = {
    "idk_it": "idk_it",
    "sft": "sft_baseline",
    "cadpo": "cadpo_pairs",
    "dpo1": "cadpo_pairs",
    "dpo2": "cadpo_pairs",
    "dpo3": "cadpo_pairs",
}
"""method -> the table (under `<run_dir>/tables/`) it trains on."""


@dataclass
class TrainResult:
    method: str
    checkpoint_dir: str | None
    """Merged HF model directory (from_pretrained / vLLM); None for LoRA with train.merge=false."""
    adapter_dir: str | None
    """peft adapter directory (LoRA only)."""
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


def run_name(train: TrainConfig, model: ModelConfig, table_uri: str, base_model_dir: str) -> str:
    blob = json.dumps(
        {
            "train": dataclasses.asdict(train),
            "dtype": model.dtype,
            "table": table_uri,
            "base": base_model_dir,
        },
        sort_keys=True,
    )
    return f"{train.method}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _columns(table_uri: str) -> set[str]:
    import pyarrow.parquet as pq

    fs, path = dio.resolve(table_uri)
    return set(pq.ParquetDataset(path, filesystem=fs).schema.names)


def needs_reference(method: str, table_uri: str) -> bool:
    """True for a DPO method whose pairs table has no ref_logp_* columns yet (run_reference_pass first)."""
    return OBJECTIVES[method][0] == DPO_KINDS and not set(S.REF_LOGP.values()) <= _columns(table_uri)


def _check_table(table_uri: str, method: str) -> None:
    """Fail in the driver, before any worker starts, when the table cannot feed this method."""
    names = _columns(table_uri)
    kinds, _ = OBJECTIVES[method]
    expected = S.CADPO_PAIRS_WITH_REF if kinds == DPO_KINDS else S.SFT
    missing = [c for c in expected.names if c not in names]
    if missing:
        hint = " (run run_reference_pass first)" if set(missing) <= set(S.REF_LOGP.values()) else ""
        raise ValueError(f"{method}: table {table_uri} lacks column(s) {missing}{hint}")


def _trainer(spec: LoopSpec, table_uri: str, storage: str, name: str):
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = spec.train
    scaling = (
        ray.train.ScalingConfig(num_workers=0)
        if cfg.num_workers == 0
        else ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        )
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        # Not split: every worker reads the whole table and takes its rows by a seeded schedule, so the data
        # of each step is the same whatever Ray Data's block order is (exact resume; see loop.py). The table
        # is read once here: Parquet read tasks inside the workers competed with them for CPUs (18 s for 64
        # rows on 2 shared cores), while blocks already in the object store need no task to iterate.
        datasets={DATASET: ray.data.from_arrow(dio.read_table(table_uri))},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )


def run_training(
    cfg: Config,
    method: str,
    table_uri: str,
    base_model_dir: str,
    out_dir: str,
    log: Callable[[str], None] = print,
    *,
    fail_after_step: int = 0,
) -> TrainResult:
    """Train `method` on `table_uri` starting from `base_model_dir`; write everything under `out_dir`.

    cfg.train.num_workers = 0 runs the loop in this process (Ray Train local mode), otherwise on that many
    Ray Train workers (DDP, or FSDP with train.strategy=fsdp). Ray must be initialised (Ray Data reads the
    table). `fail_after_step` is a test hook: one worker raises once after that step.
    """
    import ray

    if method not in OBJECTIVES:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(OBJECTIVES)}")
    if not ray.is_initialized():
        raise RuntimeError("run_training needs a running Ray (inbol_ray.runtime.init_ray)")
    t0 = time.time()
    table_uri, base_model_dir = dio.absolute(table_uri), dio.absolute(base_model_dir)
    _check_table(table_uri, method)
    dpo = method in ("cadpo", "dpo1", "dpo2", "dpo3")
    lr = cfg.train.dpo_lr if dpo and cfg.train.dpo_lr > 0 else cfg.train.lr
    train = dataclasses.replace(cfg.train, method=method, lr=lr)
    out = Path(dio.absolute(out_dir))
    storage = out / "ray"
    name = run_name(train, cfg.model, table_uri, base_model_dir)
    spec = LoopSpec(
        train=train,
        method=method,
        base_model_dir=base_model_dir,
        model_dtype=cfg.model.dtype,
        local_checkpoint_dir=str(storage / name) if train.num_workers == 0 else "",
        tensorboard_dir=str(out / "tensorboard") if train.tensorboard else "",
        fail_after_step=fail_after_step,
        fault_marker=str(storage / name / "fault_injected") if fail_after_step else "",
    )
    mode = (
        "local mode (in the driver)"
        if train.num_workers == 0
        else (f"{train.num_workers} Ray Train workers, {train.strategy}, {'GPU' if train.use_gpu else 'CPU'}")
    )
    log(f"[train {method}] {mode}; table {table_uri}; run {storage / name}")
    result = _trainer(spec, table_uri, str(storage), name).fit()
    checkpoint = result.checkpoint
    if checkpoint is None:  # local mode rerun of a finished run: nothing was reported this time
        from inbol_ray.train.loop import _latest_local

        latest = _latest_local(spec.local_checkpoint_dir)
        if latest is None:
            raise RuntimeError(f"training {method} produced no checkpoint")
        from ray.train import Checkpoint

        checkpoint = Checkpoint.from_directory(str(latest))
    with checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / STATE_FILE).read_text())
        model_dir, adapter_dir = _export(train, cfg.model.dtype, base_model_dir, Path(directory), out)
    metrics_path = out / "metrics.jsonl"
    write_jsonl(state["history"], metrics_path)
    final = {k: v for k, v in state["history"][-1].items() if k != "ids"} if state["history"] else {}
    res = TrainResult(
        method=method,
        checkpoint_dir=str(model_dir) if model_dir else None,
        adapter_dir=str(adapter_dir) if adapter_dir else None,
        train_checkpoint=checkpoint.path,
        steps=state["step"],
        final_metrics=final,
        metrics_uri=str(metrics_path),
        seconds=time.time() - t0,
        resumed_from=state["resumes"],
        probe=state.get("probe", {}),
    )
    (out / "train_result.json").write_text(json.dumps(dataclasses.asdict(res), indent=1, default=str))
    log(f"[train {method}] " + res.summary_line())
    return res


def _export(
    train: TrainConfig, dtype: str, base_model_dir: str, checkpoint_dir: Path, out: Path
) -> tuple[Path | None, Path | None]:
    """Rebuild the policy from the base and the checkpoint's trainable tensors, then save adapter/merged."""
    from transformers import AutoProcessor

    from inbol_ray.checkpoint import load_for_training
from inbol_ray.train.lora import (
        export_model,
            load_trainable_state,
        prepare_policy,
        read_trainable,
    )

    policy = prepare_policy(load_for_training(base_model_dir, dtype), train)
    load_trainable_state(policy, read_trainable(checkpoint_dir))
    return export_model(policy, AutoProcessor.from_pretrained(base_model_dir), out, train.merge)


__all__ = ["METHOD_TABLES", "TrainResult", "needs_reference", "run_reference_pass", "run_training"]
