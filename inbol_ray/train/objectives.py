"""Per-method training objectives on one micro-batch: the loss to backward and the sums to log.

Normalisation is global, so results do not depend on how a step is split: every worker reads all of the
step's rows and knows their response tokens (`StepNorm`), each micro-batch loss is a *sum* divided by
the step's global count and multiplied by the world size (DDP averages gradients over workers). Hence
1 worker × batch 8 gives the same gradient as 2 workers × 4 rows or 4 accumulation steps × 2 rows.

Logging returns sums (never means) for the same reason: they add up across micro-batches and workers with
one all-reduce, and the means are taken once per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from inbol_ray import methods as M
from inbol_ray import schema as S
from inbol_ray.config import TrainConfig
from inbol_ray.train.data import DPO_KINDS, SFT_KINDS, RowValues
from inbol_ray.train.losses import PAIRS, cadpo_loss, dpo_stats, pair_weights, response_nll
from inbol_ray.train.shared_prefix import PackedBatch, per_response


@dataclass(frozen=True)
class StepNorm:
    rows: int
    """Rows in the whole optimizer step (all workers, all micro-batches)."""
    response_tokens: int
    """Response tokens in the whole step (the SFT denominator)."""
    world_size: int


Objective = Callable[
    [Tensor, PackedBatch, RowValues, TrainConfig, str, StepNorm], tuple[Tensor, dict[str, float]]
]

SFT_GROUPS = S.TARGET_KINDS  # codes 0, 1 in data.TARGET_KIND_CODES
DPO_GROUPS = S.BUCKETS  # codes 0, 1, 2 in losses.BUCKET_CODES


def _group_sums(row_loss: Tensor, groups: Tensor, names: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    row_loss = row_loss.detach().double()
    for code, name in enumerate(names):
        rows = groups == code
        out[f"loss/{name}/sum"] = float(row_loss[rows].sum())
        out[f"loss/{name}/rows"] = float(rows.sum())
    return out


def sft_objective(
    token_logps: Tensor, batch: PackedBatch, values: RowValues, cfg: TrainConfig, method: str, norm: StepNorm
) -> tuple[Tensor, dict[str, float]]:
    """Response-only next-token cross-entropy, averaged over the step's response tokens (DESIGN.md 1.1)."""
    loss = -token_logps.sum() / norm.response_tokens * norm.world_size
    row_nll = response_nll(token_logps.detach(), batch.pred_rows, batch.present.shape[0])
    sums = {"loss/sum": float(-token_logps.detach().double().sum() / norm.response_tokens)}
    sums.update(_group_sums(row_nll, values.groups, SFT_GROUPS))
    return loss, sums


def dpo_objective(
    token_logps: Tensor, batch: PackedBatch, values: RowValues, cfg: TrainConfig, method: str, norm: StepNorm
) -> tuple[Tensor, dict[str, float]]:
    """CA-DPO or an ablation (variant = method), plus optional NLL on the chosen responses (sft_weight).

    The NLL term uses the pair weights of the loss itself: a row's chosen response of pair p gets weight
    w_p, so e.g. a mixed CA-DPO row imitates its correct answer with weight conf and its refusal with 1−conf.
    """
    lp = per_response(token_logps, batch)
    ref = values.ref_logps.to(lp)
    logps = {kind: lp[:, i] for i, kind in enumerate(DPO_KINDS)}
    refs = {kind: ref[:, i] for i, kind in enumerate(DPO_KINDS)}
    conf = values.conf.to(lp)
    row_loss = cadpo_loss(logps, refs, conf, values.groups, cfg.beta, variant=method, reduction="none")
    if cfg.sft_weight > 0:
        lengths = torch.bincount(batch.slots, minlength=batch.present.numel()).view_as(lp).clamp(min=1)
        nll = -torch.where(batch.present, lp, torch.zeros_like(lp)) / lengths
        weights = pair_weights(conf, values.groups.to(lp.device), method)
        for pair, (chosen, _) in PAIRS.items():
            row_loss = row_loss + cfg.sft_weight * weights[pair] * nll[:, DPO_KINDS.index(chosen)]
    loss = row_loss.sum() / norm.rows * norm.world_size
    sums = {"loss/sum": float(row_loss.detach().double().sum() / norm.rows)}
    sums.update(_group_sums(row_loss, values.groups, DPO_GROUPS))
    stats = dpo_stats(logps, refs, values.groups, cfg.beta)
    for pair in PAIRS:  # per-pair means (NaN without rows) -> sums that add across micro-batches
        n = stats[f"{pair}/n"]
        sums[f"{pair}/n"] = n
        for stat in ("margin", "accuracy"):
            sums[f"{pair}/{stat}_sum"] = stats[f"{pair}/{stat}"] * n if n else 0.0
    return loss, sums


OBJECTIVES: dict[str, tuple[tuple[str, ...], Objective]] = {
    "sft": (SFT_KINDS, sft_objective),
    "dpo": (DPO_KINDS, dpo_objective),
}
"""objective kind (`inbol_ray.methods.Method.objective`) -> (response slots per row, objective function).
The DPO variants share one function: the method name is the variant (mixed-row weights)."""


def objective_for(method: str) -> tuple[tuple[str, ...], Objective]:
    """(response slots, objective) of a trained method, looked up through the method table."""
    m = M.method(method)
    if m.objective is None:
        raise ValueError(f"method {method!r} is not trained (trained: {', '.join(M.TRAINED)})")
    return OBJECTIVES[m.objective]


def step_means(sums: dict[str, float]) -> dict[str, float]:
    """Globally summed logging values -> the step's metrics (per-group loss, pair margins and accuracies)."""
    out = {"loss": sums["loss/sum"]}
    for key, value in sums.items():
        if key.startswith("loss/") and key.endswith("/sum") and key != "loss/sum":
            group = key[len("loss/") : -len("/sum")]
            rows = sums[f"loss/{group}/rows"]
            out[f"loss/{group}"] = value / rows if rows else float("nan")
        elif key.endswith("/n"):
            pair, n = key[:-2], value
            out[f"{pair}/margin"] = sums[f"{pair}/margin_sum"] / n if n else float("nan")
            out[f"{pair}/accuracy"] = sums[f"{pair}/accuracy_sum"] / n if n else float("nan")
    return out
