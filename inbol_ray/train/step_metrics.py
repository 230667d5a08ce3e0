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
from inbol_ray.train.data import DPO_KINDS
from inbol_ray.train.losses import _PAIR_BUCKETS, PAIRS


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


PREFERENCE_STATS = ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected")
"""Per pair type, beside the objective's `<pair>/margin` and `<pair>/accuracy`: the policy's sequence
log-probs of the chosen and rejected responses and their implicit rewards beta * (log pi - log ref), the
numbers TRL's DPO trainer reports (`logps/chosen`, `rewards/margins`, ...). A falling `logps/chosen` with a
rising margin is the known DPO failure of pushing both responses down; the loss alone hides it."""


@torch.no_grad()
def preference_sums(
    logps: torch.Tensor, ref_logps: torch.Tensor, groups: torch.Tensor, beta: float
) -> dict[str, float]:
    """Sums of `PREFERENCE_STATS` per pair over the rows whose bucket uses the pair (as `dpo_stats` counts
    them, `<pair>/n`): sums, so they add over micro-batches and workers like every logged value.
    `logps`, `ref_logps`: [B, 3] per-response log-probs in `DPO_KINDS` order; `groups`: bucket codes."""
    logps, ref_logps = logps.double(), ref_logps.to(logps.device).double()
    groups = groups.to(logps.device)
    out: dict[str, float] = {}
    for pair, (chosen, rejected) in PAIRS.items():
        rows = torch.isin(groups, torch.tensor(_PAIR_BUCKETS[pair], device=groups.device))
        for side, kind in (("chosen", chosen), ("rejected", rejected)):
            i = DPO_KINDS.index(kind)
            lp, ref = logps[rows, i], ref_logps[rows, i]
            out[f"{pair}/logps/{side}_sum"] = float(lp.sum())
            out[f"{pair}/rewards/{side}_sum"] = float(beta * (lp - ref).sum())
    return out


def preference_means(totals: dict[str, float]) -> dict[str, float]:
    """The step's per-pair means of `preference_sums`, and TRL's pooled names over every (row, pair) the
    step trained (a mixed row counts once per pair it uses): `rewards/{chosen,rejected,margins,accuracies}`,
    `logps/{chosen,rejected}`. NaN where no row used the pair."""

    def mean(total: float, n: float) -> float:
        return total / n if n else float("nan")

    out: dict[str, float] = {}
    pooled = dict.fromkeys([*PREFERENCE_STATS, "margin", "accuracy", "n"], 0.0)
    for pair in PAIRS:
        n = totals.get(f"{pair}/n", 0.0)
        pooled["n"] += n
        for stat in PREFERENCE_STATS:
            out[f"{pair}/{stat}"] = mean(totals[f"{pair}/{stat}_sum"], n)
            pooled[stat] += totals[f"{pair}/{stat}_sum"]
        for stat in ("margin", "accuracy"):
            pooled[stat] += totals.get(f"{pair}/{stat}_sum", 0.0)
    n = pooled["n"]
    out.update({stat: mean(pooled[stat], n) for stat in PREFERENCE_STATS})
    out["rewards/margins"] = mean(pooled["margin"], n)
    out["rewards/accuracies"] = mean(pooled["accuracy"], n)
    return out


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
