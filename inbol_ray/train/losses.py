"""CA-DPO and its ablations (DESIGN.md 1.2), and the response-only cross-entropy of SFT / IDK-IT.

Inputs are per-response sequence log-probs (sum over response tokens, e.g. from
inbol_ray.train.logprob.fused_response_logprobs), one [B] tensor per response kind. A row only carries
the responses its bucket needs (known rows have no `incorrect`, unknown rows no `correct`), so the unused
entries are NaN or garbage. They are replaced by 0 *before* any arithmetic: multiplying a NaN term by a
zero weight, or selecting around it with torch.where, still yields NaN in the loss or in the gradient
(0 * NaN = NaN, and where's backward multiplies the unselected branch's local gradient by 0). With the
sanitising where first, an unused entry provably cannot change a row's loss or any gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from inbol_ray import schema

KNOWN, MIXED, UNKNOWN = schema.BUCKETS
CORRECT, INCORRECT, REFUSAL = schema.RESPONSE_KINDS
BUCKET_CODES = {KNOWN: 0, MIXED: 1, UNKNOWN: 2}

# Preference pairs (chosen, rejected) and the buckets whose rows use them.
PAIRS: dict[str, tuple[str, str]] = {
    "correct>refusal": (CORRECT, REFUSAL),
    "correct>incorrect": (CORRECT, INCORRECT),
    "refusal>incorrect": (REFUSAL, INCORRECT),
}
_PAIR_BUCKETS = {"correct>refusal": (0,), "correct>incorrect": (1,), "refusal>incorrect": (1, 2)}

MixedWeights = Callable[[Tensor], tuple[Tensor, Tensor]]

MIXED_WEIGHTS: dict[str, MixedWeights] = {
    # mixed rows: weights of p1 = correct>incorrect and p2 = refusal>incorrect
    "cadpo": lambda conf: (conf, 1.0 - conf),
    "dpo1": lambda conf: (torch.zeros_like(conf), torch.ones_like(conf)),
    "dpo2": lambda conf: (torch.ones_like(conf), torch.zeros_like(conf)),
    "dpo3": lambda conf: (torch.full_like(conf, 0.5), torch.full_like(conf, 0.5)),
}
"""Known and unknown rows are the same in every variant; only the mixed-row weighting differs (paper 4.4)."""


def dpo_term(pi_w: Tensor, pi_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    """f(x, y_w > y_l) = log sigma(beta * [(pi_w - ref_w) - (pi_l - ref_l)]), per row (<= 0; 0 is best)."""
    return F.logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))


def bucket_codes(bucket: Sequence[str] | Tensor, device: torch.device | None = None) -> Tensor:
    """Bucket names (or codes already) -> int64 codes known=0, mixed=1, unknown=2."""
    if isinstance(bucket, Tensor):
        codes = bucket.to(device=device, dtype=torch.long)
    else:
        try:
            codes = torch.tensor([BUCKET_CODES[str(b)] for b in bucket], dtype=torch.long, device=device)
        except KeyError as exc:
            raise ValueError(
                f"unknown bucket {exc.args[0]!r}; expected one of {list(BUCKET_CODES)}"
            ) from None
    if codes.numel() and (codes.min() < 0 or codes.max() > 2):
        raise ValueError("bucket codes must be 0 (known), 1 (mixed) or 2 (unknown)")
    return codes


def pair_weights(conf: Tensor, codes: Tensor, variant: str) -> dict[str, Tensor]:
    """Per-row weight of each preference pair: L_row = -sum_pair weight * f(pair)."""
    if variant not in MIXED_WEIGHTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(MIXED_WEIGHTS)}")
    w1, w2 = MIXED_WEIGHTS[variant](conf)
    known, mixed, unknown = codes == 0, codes == 1, codes == 2
    zero = torch.zeros_like(conf)
    return {
        "correct>refusal": torch.where(known, torch.ones_like(conf), zero),
        "correct>incorrect": torch.where(mixed, w1, zero),
        "refusal>incorrect": torch.where(mixed, w2, torch.where(unknown, torch.ones_like(conf), zero)),
    }


def _sanitised(
    values: Mapping[str, Tensor], needed: Mapping[str, Tensor], like: Tensor, name: str
) -> dict[str, Tensor]:
    out = {}
    for kind, mask in needed.items():
        value = values.get(kind)
        if value is None:
            if bool(mask.any()):
                raise ValueError(f"{name}[{kind!r}] is missing but some rows need it")
            value = torch.zeros_like(like)
        out[kind] = torch.where(mask, value, torch.zeros((), dtype=value.dtype, device=value.device))
    return out


def cadpo_loss(
    logps: Mapping[str, Tensor],
    ref_logps: Mapping[str, Tensor],
    conf: Tensor,
    bucket: Sequence[str] | Tensor,
    beta: float,
    variant: str = "cadpo",
    reduction: str = "mean",
) -> Tensor:
    """L = -E[w1 * f(p1) + w2 * f(p2)] with pairs by bucket and mixed-row weights by variant.

    known: p1 = p2 = correct>refusal; mixed: p1 = correct>incorrect, p2 = refusal>incorrect;
    unknown (and unanswerable): p1 = p2 = refusal>incorrect. reduction: "mean" over rows, "sum" (divide by
    the global row count yourself under gradient accumulation), or "none" (per-row [B]).
    """
    first = next(iter(logps.values()))
    conf = conf.to(device=first.device, dtype=first.dtype)
    codes = bucket_codes(bucket, first.device)
    weights = pair_weights(conf, codes, variant)
    used = {pair: w > 0 for pair, w in weights.items()}
    needed = {
        CORRECT: used["correct>refusal"] | used["correct>incorrect"],
        INCORRECT: used["correct>incorrect"] | used["refusal>incorrect"],
        REFUSAL: used["correct>refusal"] | used["refusal>incorrect"],
    }
    pi = _sanitised(logps, needed, first, "logps")
    ref = _sanitised(ref_logps, needed, first, "ref_logps")
    row_loss = torch.zeros_like(conf)
    for pair, (chosen, rejected) in PAIRS.items():
        term = dpo_term(pi[chosen], pi[rejected], ref[chosen], ref[rejected], beta)
        row_loss = row_loss - torch.where(used[pair], weights[pair] * term, torch.zeros_like(term))
    if reduction == "none":
        return row_loss
    if reduction == "sum":
        return row_loss.sum()
    if reduction == "mean":
        return row_loss.mean()
    raise ValueError(f"reduction must be mean|sum|none, got {reduction!r}")


@torch.no_grad()
def dpo_stats(
    logps: Mapping[str, Tensor], ref_logps: Mapping[str, Tensor], bucket: Sequence[str] | Tensor, beta: float
) -> dict[str, float]:
    """For logging: per pair, mean reward margin beta*[(pi_w-ref_w)-(pi_l-ref_l)], the fraction of rows
    where it is positive, and the row count, over the rows whose bucket uses the pair (NaN when none)."""
    first = next(iter(logps.values()))
    codes = bucket_codes(bucket, first.device)
    stats: dict[str, float] = {}
    for pair, (chosen, rejected) in PAIRS.items():
        rows = torch.isin(codes, torch.tensor(_PAIR_BUCKETS[pair], device=codes.device))
        n = int(rows.sum())
        stats[f"{pair}/n"] = float(n)
        if n == 0 or chosen not in logps or rejected not in logps:
            stats[f"{pair}/margin"] = stats[f"{pair}/accuracy"] = float("nan")
            continue
        margin = beta * (
            (logps[chosen][rows] - ref_logps[chosen][rows])
            - (logps[rejected][rows] - ref_logps[rejected][rows])
        )
        stats[f"{pair}/margin"] = float(margin.float().mean())
        stats[f"{pair}/accuracy"] = float((margin > 0).float().mean())
    return stats


# --- SFT / IDK-IT ---------------------------------------------------------------------------------


def response_nll(token_logps: Tensor, segment_ids: Tensor, n_segments: int) -> Tensor:
    """Mean negative log-likelihood of each response's tokens: [N] token log-probs -> [n_segments].

    `segment_ids[t]` says which response token t belongs to (prompt tokens are simply not passed in,
    which is what makes the loss response-only). A response with no tokens is an error, not a silent 0.
    """
    if token_logps.shape != segment_ids.shape or token_logps.ndim != 1:
        raise ValueError(
            f"token_logps {tuple(token_logps.shape)} and segment_ids {tuple(segment_ids.shape)} must be [N]"
        )
    segment_ids = segment_ids.to(device=token_logps.device, dtype=torch.long)
    counts = torch.bincount(segment_ids, minlength=n_segments)
    if counts.numel() != n_segments or bool((counts == 0).any()):
        raise ValueError(
            f"every one of {n_segments} responses needs >= 1 token and ids < n_segments; got {counts.tolist()}"
        )
    sums = torch.zeros(n_segments, dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, segment_ids, -token_logps
    )
    return sums / counts.to(token_logps.dtype)


def sft_loss(token_logps: Tensor, num_tokens: int | None = None) -> Tensor:
    """Next-token cross-entropy averaged over response tokens (the HF / torchtune convention).

    Under gradient accumulation pass `num_tokens` = response tokens in the whole accumulated batch, so
    micro-batch losses sum to the full-batch loss instead of giving short micro-batches extra weight.
    """
    denominator = token_logps.numel() if num_tokens is None else num_tokens
    if denominator <= 0:
        raise ValueError("sft_loss needs at least one response token")
    return -token_logps.sum() / denominator
