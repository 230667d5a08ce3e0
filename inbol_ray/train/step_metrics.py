"""Per-step metrics: one global reduction, one row per step, a progress line, optional TensorBoard.

Rows are kept in memory on rank 0 and travel inside every checkpoint (`state.json`), so after a worker
failure the history is exactly the checkpoint's steps followed by the re-run ones: no step is logged twice
and none is lost, on any storage Ray Train can write to. The driver writes the final history to
`<out_dir>/metrics.jsonl` (one JSON object per step, including the ids of the rows the step trained on).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from inbol_ray.data import io as dio


def all_reduce_sums(sums: dict[str, float], keys: Sequence[str]) -> dict[str, float]:
    """Sum the logging values over workers (a no-op in one process). Every worker passes the same keys."""
    vec = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        backend = dist.get_backend()
        device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )
        vec = vec.to(device)
        dist.all_reduce(vec, op=dist.ReduceOp.SUM)
        vec = vec.cpu()
    return dict(zip(keys, vec.tolist(), strict=True))


def add_sums(total: dict[str, float], part: dict[str, float]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + value


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json_row(row: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf -> null: JSON has no NaN, and a pair without rows in a step is 'no value', not a number."""
    return {k: _json_safe(v) for k, v in row.items()}


def progress_line(method: str, row: dict[str, Any], total_steps: int) -> str:
    """One line per logging interval: what a user watches on the driver."""
    parts = [f"[train {method}] step {row['step']}/{total_steps}", f"loss {row['loss']:.4f}"]
    for pair in ("correct>refusal", "correct>incorrect", "refusal>incorrect"):
        acc = row.get(f"{pair}/accuracy")
        if acc is not None and math.isfinite(acc):
            parts.append(f"{pair} acc {acc:.2f}")
    parts += [f"grad {row['grad_norm']:.3f}", f"{row['tokens_per_s']:.0f} tok/s"]
    return " | ".join(parts)


def log_every(total_steps: int) -> int:
    """Progress-line interval: about ten lines per run (derived, not configured)."""
    return max(1, total_steps // 10)


class TensorBoardLog:
    """Scalars of every step to `<logdir>` (tensorboardX, else torch.utils.tensorboard).

    A remote `logdir` (`s3://...`) is written to a local temporary folder and uploaded on `close`: event
    writers append to local files."""

    def __init__(self, logdir: str) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # pragma: no cover - depends on the environment
            from torch.utils.tensorboard import SummaryWriter
        self.uri = logdir
        fs, path = dio.resolve(logdir)
        self.local = path if isinstance(fs, pafs.LocalFileSystem) else tempfile.mkdtemp(prefix="inbol_tb_")
        os.makedirs(self.local, exist_ok=True)
        self.writer = SummaryWriter(self.local)

    def write(self, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        from inbol_ray.checkpoint import upload_dir

        upload_dir(self.local, self.uri)


def write_jsonl(rows: Sequence[dict[str, Any]], location: str) -> None:
    """One JSON object per line (NaN -> null) at a local path or URI."""
    dio.write_bytes(location, "".join(json.dumps(to_json_row(r)) + "\n" for r in rows).encode())


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: VmHWM (Linux), which an exec resets, unlike ru_maxrss,
    which a process inherits from its parent's peak across fork + exec; ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
