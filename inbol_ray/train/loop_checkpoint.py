"""Ray Train checkpoints of the training loop: what one holds, how it is written, found and restored.

A checkpoint is a folder with the trainable tensors (`trainable.safetensors`), the optimizer state and
`state.json` (step, metric history, resume points; written last, so its presence marks a complete
checkpoint). Split out of loop.py so the loop reads as setup -> steps; nothing here decides *when* to
checkpoint. Under FSDP the full tensors and optimizer state are gathered on rank 0 (a collective call).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import ray.train
import torch
from torch import nn

from inbol_ray.train.lora import save_trainable, trainable_state

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def latest_local(root: str) -> Path | None:
    """The newest complete checkpoint under a local-mode checkpoint folder (None when there is none)."""
    if not root or not Path(root).is_dir():
        return None
    done = sorted(p for p in Path(root).glob("checkpoint_[0-9]*") if (p / STATE_FILE).exists())
    return done[-1] if done else None


@contextlib.contextmanager
def restored_checkpoint(local_checkpoint_dir: str) -> Iterator[Path | None]:
    """The checkpoint to resume from, as a local directory for the duration of the block (or None)."""
    if local_checkpoint_dir:
        yield latest_local(local_checkpoint_dir)
        return
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        yield None
        return
    with ckpt.as_directory() as directory:
        yield Path(directory)


def gather_state(scorer: nn.Module, policy: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full trainable tensors and optimizer state on rank 0 (FSDP gathers its shards; collective)."""
    if not is_fsdp(scorer):
        return trainable_state(policy), opt.state_dict()
    from torch.distributed.fsdp import (
        FullOptimStateDictConfig,
        FullStateDictConfig,
        StateDictType,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    # offload_to_cpu only for GPU models: on a CPU model FSDP's full-state-dict hook segfaults with it
    # (torch 2.13, seen here), and the tensors are on the CPU already.
    offload = next(scorer.parameters()).is_cuda
    with FSDP.state_dict_type(
        scorer,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload, rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True),
    ):
        full = scorer.state_dict()
        optim = FSDP.optim_state_dict(scorer, opt)
    return {n: full[f"model.{n}"].contiguous() for n in names if f"model.{n}" in full}, optim


def read_optimizer(directory: Path) -> dict:
    """The optimizer state saved in a checkpoint, loaded as tensors and plain values only.

    `weights_only`: the file comes from storage (a bucket, a shared folder), and a full unpickle runs
    whatever code whoever could write there put in it. What `write_checkpoint` saves (AdamW's or FSDP's
    optimizer state dict: tensors, numbers, tuples, None) needs nothing more. On the CPU: each worker
    moves it to its parameters' device when loading, instead of every rank landing on the saving GPU.
    """
    return torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)


def load_optimizer(scorer: nn.Module, opt: torch.optim.Optimizer, saved: dict) -> None:
    if is_fsdp(scorer):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        saved = FSDP.optim_state_dict_to_load(scorer, opt, saved)
    opt.load_state_dict(saved)


def write_checkpoint(directory: Path, trainable: dict, optim: dict, state: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_trainable(trainable, directory)
    torch.save(optim, directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps(state))  # last: its presence marks a complete checkpoint


def report_checkpoint(
    local_checkpoint_dir: str, num_to_keep: int, rank: int, step: int, metrics: dict, payload: tuple | None
) -> None:
    """Write the checkpoint (rank 0) and report it; every worker calls this (ray.train.report is collective)."""
    name = f"checkpoint_{step:06d}"
    from ray.train import Checkpoint

    if local_checkpoint_dir:
        directory = Path(local_checkpoint_dir) / name
        write_checkpoint(directory, *payload)
        old = sorted(p for p in Path(local_checkpoint_dir).glob("checkpoint_[0-9]*") if p != directory)
        for stale in old[: max(0, len(old) + 1 - num_to_keep)]:
            shutil.rmtree(stale, ignore_errors=True)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(directory)))
        return
    with tempfile.TemporaryDirectory(prefix="inbol_ckpt_") as tmp:
        checkpoint = None
        if rank == 0:
            write_checkpoint(Path(tmp), *payload)
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
