"""Fused response log-probs: log_softmax(hidden @ weight.T + bias)[targets] without [N, V] logits.

Why: DPO-style losses need Σ_t log π(y_t | x, y_<t) over *response* tokens only (a few per item here), yet
the usual code materialises float32 logits for every position of every sequence and keeps a second
[N, V] tensor (the log-softmax output) alive for backward. This op walks the N response rows in chunks of
`chunk_size`, holds one [chunk, V] float32 block at a time, saves only the inputs plus one float per row
(the log-sum-exp), and recomputes each block in backward. It returns per-token log-probs, so any loss
(DPO, CA-DPO, SFT cross-entropy) sits on top; `segment_sum` turns them into per-response sums.

The maths (row i, logits z = W h_i + b, p = softmax(z), target t = t_i, upstream gradient g_i):
    logp_i        = z_t − lse(z),             lse(z) = m + log Σ_v exp(z_v − m),  m = max_v z_v
    ∂logp_i/∂z    = onehot(t) − p
    ∂L/∂h_i       = g_i · (W_t − pᵀW)          = −g_i · (p − onehot(t))ᵀ W
    ∂L/∂W         = Σ_i g_i (onehot(t_i) − p_i) h_iᵀ
    ∂L/∂b         = Σ_i g_i (onehot(t_i) − p_i)
Backward forms the block Gn = p − onehot(t) in place (exp of the recomputed logits minus the saved lse,
then −1 at the targets) and folds g into the thin [chunk, D] side of each matmul instead of scaling the
[chunk, V] block: one pass over the block fewer.

Precision: the log-softmax statistics, the block Gn and the weight-gradient accumulator are float32 (or
float64 for float64 inputs). For bfloat16/float16 inputs the logits matmul runs in the input dtype (the GEMM
accumulates in float32 internally and rounds its output, exactly like the model's own lm_head) and is then
upcast; Gn is built in float32 and only rounded to the input dtype for the hidden-gradient matmul, which
avoids the cancellation of computing W_t − pᵀW in low precision.

Device: plain torch, so CPU and CUDA share one implementation. A Triton kernel for CUDA would be a second
autograd.Function chosen in `fused_response_logprobs` when `hidden.is_cuda`; it is not built yet because it
could not be tested (no GPU was available when this op was written).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK_SIZE = 1024
"""Rows per block. 1024 × V=32000 float32 = 125 MiB; big enough that the GEMMs run near peak on CPU."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the softmax statistics and the returned log-probs: float32 at least, float64 kept."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Write hidden @ weight.T (+ bias) into the float32/64 block `out` (same rows as `hidden`)."""
    if hidden.dtype == out.dtype:
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias.to(out.dtype), hidden, weight.t(), out=out)
    # Low precision: the GEMM returns the input dtype (no mixed-dtype out on CPU); upcast into the block.
    low = torch.mm(hidden, weight.t()) if bias is None else torch.addmm(bias, hidden, weight.t())
    return out.copy_(low)


class _ChunkedResponseLogprob(torch.autograd.Function):
    """The chunked forward/backward. Use `fused_response_logprobs`, which validates the inputs."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        bias: Tensor | None,
        chunk_size: int,
    ) -> Tensor:
        n = hidden.shape[0]
        cd = compute_dtype(hidden.dtype)
        logp = torch.empty(n, dtype=cd, device=hidden.device)
        lse = torch.empty(n, dtype=cd, device=hidden.device)
        block = torch.empty(min(chunk_size, n), weight.shape[0], dtype=cd, device=hidden.device)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            z = _logits_into(block[: stop - start], hidden[start:stop], weight, bias)
            z_target = z.gather(1, targets[start:stop, None]).squeeze(1)
            # In-place log-sum-exp so the chunk never needs a second [chunk, V] buffer.
            m = z.amax(dim=1, keepdim=True)
            lse_c = m.squeeze(1) + z.sub_(m).exp_().sum(dim=1).log()
            lse[start:stop] = lse_c
            logp[start:stop] = z_target - lse_c
        ctx.save_for_backward(hidden, weight, targets, bias, lse)
        ctx.chunk_size = chunk_size
        return logp

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_logp: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, Tensor | None, None]:
        hidden, weight, targets, bias, lse = ctx.saved_tensors
        need_h, need_w, _, need_b, _ = ctx.needs_input_grad
        n, chunk_size = hidden.shape[0], ctx.chunk_size
        cd = lse.dtype
        low_precision = hidden.dtype != cd
        g = grad_logp.to(cd)
        grad_h = torch.empty_like(hidden) if need_h else None
        # Accumulate the weight gradient in float32 even for bf16 weights: it sums over all chunks.
        grad_w = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=cd, device=weight.device) if need_b else None
        block = torch.empty(min(chunk_size, n), weight.shape[0], dtype=cd, device=hidden.device)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            h_c, t_c, g_c = hidden[start:stop], targets[start:stop, None], g[start:stop, None]
            z = _logits_into(block[: stop - start], h_c, weight, bias)
            gn = z.sub_(lse[start:stop, None]).exp_()  # softmax p
            gn.scatter_add_(1, t_c, torch.full_like(g_c, -1.0))  # p − onehot(t)
            if need_h:
                gn_mm = gn.to(weight.dtype) if low_precision else gn
                grad_h[start:stop] = torch.mm(gn_mm, weight).to(cd).mul_(-g_c)
            if need_w:
                grad_w.addmm_(gn.t(), h_c.to(cd) * g_c, alpha=-1.0)
            if need_b:
                grad_b.addmv_(gn.t(), g_c.squeeze(1), alpha=-1.0)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, None, grad_b, None


def fused_response_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    bias: Tensor | None = None,
) -> Tensor:
    """log_softmax(hidden @ weight.T + bias)[i, targets[i]] for every row i, as a [N] tensor.

    hidden [N, D] are the final hidden states at the positions that *predict* the response tokens (the
    caller shifts: position t−1 predicts token t), weight [V, D] the lm_head weight, targets [N] int64 token
    ids, bias [V] an optional lm_head bias. Differentiable w.r.t. hidden, weight and bias. Returns float32
    (float64 for float64 inputs) whatever the input dtype, because per-response sums of log-probs feed
    differences of nearly equal numbers in DPO.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            f"want hidden [N, D], weight [V, D], targets [N]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if hidden.shape[0] != targets.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)}"
        )
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"hidden, weight and bias must share a dtype; got {hidden.dtype}, {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[0] == 0:
        # Keep the graph connected so callers can always call backward on a sum.
        return (hidden.sum(dim=1) * 0).to(compute_dtype(hidden.dtype))
    return _ChunkedResponseLogprob.apply(hidden.contiguous(), weight, targets.long(), bias, chunk_size)


def naive_response_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None
) -> Tensor:
    """The reference the op must equal: full [N, V] logits, log_softmax, gather (what TRL-style code does)."""
    logits = torch.nn.functional.linear(hidden, weight, bias).to(compute_dtype(hidden.dtype))
    return logits.log_softmax(dim=-1).gather(1, targets.long()[:, None]).squeeze(1)


def segment_sum(values: Tensor, segment_ids: Tensor, n_segments: int) -> Tensor:
    """out[s] = Σ values[i] over i with segment_ids[i] == s; empty segments give 0. Differentiable.

    Why: response tokens of a whole batch are flattened into one [N] row set for the op; DPO needs one
    log-prob per response, i.e. the per-token values summed back per sequence.
    """
    if values.shape != segment_ids.shape or values.dim() != 1:
        raise ValueError(
            f"values and segment_ids must be matching [N]; got {values.shape}, {segment_ids.shape}"
        )
    out = torch.zeros(n_segments, dtype=values.dtype, device=values.device)
    return out.index_add(0, segment_ids.long(), values)
