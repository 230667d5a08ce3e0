"""The per-worker training loop that Ray Train runs (and local mode runs in the driver).

setup → (restore) → steps → final checkpoint. What makes it exact under failures:
- Every worker reads the rows of each step from the table's files itself (table_rows.py), addressing rows
  by their place on disk (or by id, for a table that fits one window), so the data does not depend on Ray
  Data's block order or on which worker runs; it holds a pool of row groups, never the table.
- The order is a pure function of (seed, epoch): step s trains on rows order_epoch[i·B:(i+1)·B] of the
  epoch's order (the tail shorter than a batch is dropped), worker r takes every world-th of them and
  splits its share into grad_accum micro-batches. Tokenising is per step (the step's B rows, cheap next to
  the forward), so token ids never exist for the whole table. A resumed run recomputes the same schedule
  and starts at the checkpoint's step, so nothing is skipped or repeated; the torch RNG is reseeded per
  step (LoRA dropout) and the learning rate is a pure function of the step (schedule.py) for the same
  reason.
- A checkpoint holds the trainable tensors, the optimizer state and the metric history up to its step
  (loop_checkpoint.py).
Reports happen only at checkpoints (each costs ~1 s), never per step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import torch
from torch import nn

from inbol_ray import console, progress
from inbol_ray.checkpoint import load_processor
from inbol_ray.config import TrainConfig
from inbol_ray.data import io as dio
from inbol_ray.tracking import RunTarget, StepLogger
from inbol_ray.train import step_metrics as sm
from inbol_ray.train.data import DPO_KINDS, EncodedTable, encode_table, make_batch
from inbol_ray.train.loop_checkpoint import (
    STATE_FILE,
    gather_state,
    is_fsdp,
    load_optimizer,
    read_optimizer,
    report_checkpoint,
    restored_checkpoint,
)
from inbol_ray.train.lora import (
    enable_gradient_checkpointing,
    load_policy,
    load_trainable_state,
    read_trainable,
)
from inbol_ray.train.objectives import StepNorm, objective_for, step_means
from inbol_ray.train.schedule import master_dtype, step_lr
from inbol_ray.train.shared_prefix import ResponseScorer, per_response
from inbol_ray.train.table_rows import RowReader, open_blocks

PROBE_ROWS = 4


@dataclass
class LoopSpec:
    """Everything a worker needs, picklable (it travels to the workers in train_loop_config)."""

    train: TrainConfig
    method: str
    base_model_dir: str
    """Location (local path or URI) of the model training starts from."""
    table_uri: str = ""
    """The training table (local path or URI): every worker reads the rows of its steps from it directly,
    a pool of row groups at a time (table_rows.py), never the whole table."""
    model_dtype: str = "float32"
    image_aspect: str = "crop"
    """How images are shaped for the vision tower (`model.image_aspect`): as sampled and evaluated."""
    system: str = ""
    """The conversation's system line (`prompt.system`): as sampled and evaluated."""
    local_checkpoint_dir: str = ""
    """Local mode only: Ray's in-driver controller keeps no checkpoints, so the loop keeps its own here
    (always a local absolute path; see trainer.local_checkpoint_dir)."""
    tensorboard_dir: str = ""
    """Location (local path or URI); rank 0 writes locally and uploads at the end when it is remote."""
    fail_after_step: int = 0
    """Fault injection for tests: the last worker raises once after finishing this step (0 = never)."""
    fault_marker: str = ""
    """Location created when the fault fires, so the restarted worker group does not fail again."""
    progress_file: str = ""
    """Where rank 0 publishes its step count for the driver's progress bar (`inbol_ray.progress`)."""
    tracking: RunTarget | None = None
    """The experiment tracker's run for this training (`inbol_ray.tracking`): rank 0 logs every step there."""


# --- schedule -------------------------------------------------------------------------------------


def torch_threads(cpus_per_worker: float) -> int:
    """Torch threads of a worker reserving `cpus_per_worker` CPUs: the reservation rounded (1.8 -> 2,
    0.5 -> 1), so a fractional reservation that leaves a sliver for Ray still uses its cores."""
    return max(1, round(cpus_per_worker))


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return max(1, n_rows // batch_size)


def total_steps(n_rows: int, cfg: TrainConfig) -> int:
    """max_steps when set (cycling epochs as needed), else epochs × full batches per epoch."""
    return cfg.max_steps or cfg.epochs * steps_per_epoch(n_rows, min(cfg.batch_size, n_rows))


def step_positions(n_rows: int, cfg: TrainConfig, step: int) -> tuple[int, int, int]:
    """(epoch, first, last+1) positions in that epoch's row order of global step `step` (0-based)."""
    batch = min(cfg.batch_size, n_rows)
    epoch, i = divmod(step, steps_per_epoch(n_rows, batch))
    return epoch, i * batch, (i + 1) * batch


def micro_batches(rows: np.ndarray, rank: int, world: int, grad_accum: int) -> list[np.ndarray]:
    share = rows[rank::world]
    if len(share) < grad_accum:
        raise ValueError(
            f"a step of {len(rows)} rows cannot feed {world} workers x {grad_accum} accumulation steps: "
            f"raise train.batch_size to at least {world * grad_accum}"
        )
    return [m for m in np.array_split(share, grad_accum)]


# --- setup ----------------------------------------------------------------------------------------


def wrap_model(scorer: ResponseScorer, cfg: TrainConfig, world: int) -> nn.Module:
    """DDP (default) or FSDP through Ray's prepare_model; FSDP on CPU is wrapped here because Ray's
    prepare_model refuses FSDP without CUDA, and every distributed path needs a CPU test (DESIGN.md 5.5)."""
    import ray.train.torch as rtt

    if world == 1:
        return rtt.prepare_model(scorer, parallel_strategy=None)
    if cfg.strategy == "fsdp":
        # use_orig_params: LoRA mixes frozen and trainable tensors in one flat parameter.
        if not cfg.use_gpu:
            from torch.distributed.fsdp import FullyShardedDataParallel

            return FullyShardedDataParallel(scorer, use_orig_params=True, device_id=torch.device("cpu"))
        return rtt.prepare_model(
            scorer, parallel_strategy="fsdp", parallel_strategy_kwargs={"use_orig_params": True}
        )
    # The vision tower is frozen, so every trainable parameter is used: no find_unused_parameters scan.
    return rtt.prepare_model(scorer, parallel_strategy="ddp")


# --- the loop -------------------------------------------------------------------------------------


@torch.no_grad()
def _probe(
    scorer: nn.Module,
    enc: EncodedTable,
    processor,
    device: torch.device,
    dtype: torch.dtype,
    image_aspect: str = "crop",
) -> dict[str, Any]:
    """Per-response log-probs of the first rows after training: the number a reloaded model must reproduce."""
    rows = list(range(min(PROBE_ROWS, len(enc))))
    packed, _ = make_batch(enc, rows, processor, image_aspect)
    packed = packed.to(device, pixel_dtype=dtype)
    scorer.eval()  # through the wrapper: an FSDP forward is collective, every worker runs it
    lp = per_response(scorer(packed), packed).double().cpu()
    scorer.train()
    values = [[None if np.isnan(v) else float(v) for v in row] for row in lp.tolist()]
    return {"ids": [enc.ids[i] for i in rows], "kinds": list(enc.kinds), "logps": values}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. Torch threads follow the worker's CPU reservation: the tiny model is far too
    small for intra-op parallelism, and on a shared machine extra spinning threads made steps 5-20x slower."""
    spec: LoopSpec = config["spec"]
    _quiet_report_log()
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads(spec.train.cpus_per_worker))
    tracker = StepLogger(spec.tracking, ray.train.get_context().get_world_rank())
    ok = False
    try:
        _train(spec, tracker)
        ok = True
    finally:
        tracker.close(ok)
        torch.set_num_threads(threads)  # local mode runs in the caller's process


def _train(spec: LoopSpec, tracker: StepLogger) -> None:
    cfg = spec.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    import ray.train.torch as rtt

    device = rtt.get_device()
    reader = RowReader(open_blocks(spec.table_uri), cfg.seed, cfg.window_rows)
    processor = load_processor(spec.base_model_dir)
    kinds, objective = objective_for(spec.method)
    need_ref = kinds == DPO_KINDS
    n_rows = reader.n_rows
    total = total_steps(n_rows, cfg)

    torch.manual_seed(cfg.seed)  # LoRA's A matrices are random: same init in every worker and in local mode
    policy = load_policy(spec.base_model_dir, spec.model_dtype, cfg)
    dtype = getattr(torch, master_dtype(cfg, spec.model_dtype))  # of the weights, so of the pixels too
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    start_step, history, resumes, saved_optim = 0, [], [], None
    with restored_checkpoint(spec.local_checkpoint_dir) as restored:
        if restored is not None:
            state = json.loads((restored / STATE_FILE).read_text())
            load_trainable_state(policy, read_trainable(restored))
            saved_optim = read_optimizer(restored)
            start_step, history = state["step"], state["history"]
            resumes = state["resumes"] + [start_step]
    if restored is not None and rank == 0:
        _say(f"[train {spec.method}] resuming from checkpoint at step {start_step}/{total}")
    scorer = wrap_model(ResponseScorer(policy, cfg.logprob_chunk_size), cfg, world)
    opt = torch.optim.AdamW(
        [p for p in scorer.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    if saved_optim is not None:
        load_optimizer(scorer, opt, saved_optim)
    scorer.train()
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    tb = sm.TensorBoardLog(spec.tensorboard_dir) if spec.tensorboard_dir and rank == 0 else None
    trainable = [p for p in scorer.parameters() if p.requires_grad]
    sum_keys: list[str] | None = None
    every = sm.log_every(total)
    publisher = progress.Publisher(spec.progress_file) if spec.progress_file and rank == 0 else None
    for step in range(start_step, total):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        epoch, lo, hi = step_positions(n_rows, cfg, step)
        _, step_table = reader.step(epoch, lo, hi)
        enc = encode_table(step_table, processor, kinds, need_ref=need_ref, system=spec.system)
        rows = np.arange(len(enc))  # this step's rows, in schedule order
        norm = StepNorm(rows=len(rows), response_tokens=enc.response_tokens(rows), world_size=world)
        micros = micro_batches(rows, rank, world, cfg.grad_accum)
        lr = step_lr(cfg, step, total)
        for group in opt.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {"tokens": 0.0}
        for i, micro in enumerate(micros):
            packed, values = make_batch(enc, micro, processor, spec.image_aspect)
            packed = packed.to(device, pixel_dtype=dtype)
            sync = i == len(micros) - 1 or not hasattr(scorer, "no_sync")
            with contextlib.nullcontext() if sync else scorer.no_sync(), autocast:
                token_logps = scorer(packed)
                loss, part = objective(token_logps, packed, values, cfg, spec.method, norm)
            loss.backward()
            sm.add_sums(sums, part)
            if need_ref:  # what TRL's DPO logs, per pair type: log-probs and implicit rewards
                lp = per_response(token_logps.detach(), packed)
                sm.add_sums(sums, sm.preference_sums(lp, values.ref_logps, values.groups, cfg.beta))
            sums["tokens"] += packed.num_tokens
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        if is_fsdp(scorer):
            grad_norm = scorer.clip_grad_norm_(max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sum_keys = sum_keys or sorted(sums)
        totals = sm.all_reduce_sums(sums, sum_keys)
        seconds = time.perf_counter() - t0
        row = {
            "step": step + 1,
            "epoch": epoch,
            **step_means(totals),
            **(sm.preference_means(totals) if need_ref else {}),
            "grad_norm": float(grad_norm),
            "lr": lr,
            "tokens_per_s": totals["tokens"] / seconds,
            "step_s": seconds,
            "rows": len(rows),
            # Peak resident memory of this worker process so far: what the streaming table read bounds.
            "rss_peak_mb": sm.peak_rss_mb(),
            "ids": [enc.ids[i] for i in rows],
        }
        history.append(row)
        if rank == 0:
            if publisher is not None:
                publisher.publish(step + 1, total, loss=round(row["loss"], 4))
            tracker.log(row)
            if tb is not None:
                tb.write(row)
            if (step + 1) % every == 0 or step + 1 == total:
                console.note(sm.progress_line(spec.method, row, total))
        last = step + 1 == total
        if last or (cfg.checkpoint_every > 0 and (step + 1) % cfg.checkpoint_every == 0):
            trainable_tensors, optim = gather_state(scorer, policy, opt)
            state = {"step": step + 1, "total_steps": total, "history": history, "resumes": resumes}
            if last:
                first = reader.rows(np.arange(min(PROBE_ROWS, n_rows)))  # the table's first rows
                first_enc = encode_table(first, processor, kinds, need_ref, spec.system)
                state["probe"] = _probe(scorer, first_enc, processor, device, dtype, spec.image_aspect)
            payload = (trainable_tensors, optim, state) if rank == 0 else None
            metrics = {k: v for k, v in sm.to_json_row(row).items() if k != "ids"}
            report_checkpoint(spec.local_checkpoint_dir, cfg.num_to_keep, rank, step + 1, metrics, payload)
        _maybe_fail(spec, step + 1, rank, world)
    if start_step >= total and rank == 0:
        _say(f"[train {spec.method}] checkpoint already at the final step {total}; nothing to train")
    if tb is not None:
        tb.close()


def _quiet_report_log() -> None:
    """Ray Train 2.60 logs each report ("Reporting training result N: TrainingReport(...)", ~900 characters
    per checkpoint) at INFO on a logger named by its source file's path, outside `ray.train`, so the
    trainer's LoggingConfig does not reach it. Raising that logger's level drops the line everywhere, log
    files included: what it held (the step's metrics, the checkpoint path) is in the run's metrics.jsonl
    and under the Ray Train storage."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _say(line: str) -> None:
    """A progress line for the driver's console. Not `print`: Ray Train patches it in its workers to go to
    stdout *and* its logger, so every line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _maybe_fail(spec: LoopSpec, step: int, rank: int, world: int) -> None:
    """Test hook: the last worker raises once after `fail_after_step`, as a crashed worker would."""
    if spec.fail_after_step != step or rank != world - 1 or not spec.fault_marker:
        return
    if dio.exists(spec.fault_marker):
        return
    dio.write_bytes(spec.fault_marker, f"worker {rank} raised after step {step}\n".encode())
    raise RuntimeError(f"injected failure after step {step} (fault_marker {spec.fault_marker})")
