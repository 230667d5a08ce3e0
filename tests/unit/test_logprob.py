"""The fused response log-prob op must equal the naive full log-softmax gather, values and gradients.

Hand-worked case (test_hand_worked_example): hidden h = [1, 0], weight rows W = [[1, 0], [0, 1], [0, 0]],
target 0. Logits z = [1, 0, 0]; lse = log(e + 2); log p_0 = 1 − log(e + 2).
∂/∂z = onehot − p = [1 − e/(e+2), −1/(e+2), −1/(e+2)] = [2/(e+2), −1/(e+2), −1/(e+2)].
∂/∂h = Σ_v (∂/∂z_v) W_v = [2/(e+2), −1/(e+2)];  ∂/∂W_v = (∂/∂z_v) · h, so only column 0 is non-zero.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inbol_ray.train.logprob import (
    fused_response_logprobs,
    naive_response_logprobs,
    segment_sum,
)


def _inputs(
    n: int, d: int, v: int, dtype: torch.dtype, seed: int = 0, bias: bool = False, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    w = torch.randn(v, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen)
    b = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    return h, w, t, b


def _values_and_grads(fn, h, w, t, b, upstream: torch.Tensor) -> list[torch.Tensor]:
    out = fn(h, w, t, b)
    params = [h, w] + ([b] if b is not None else [])
    return [out.detach(), *torch.autograd.grad(out, params, upstream.to(out.dtype))]


def _fused(chunk: int):
    return lambda h, w, t, b: fused_response_logprobs(h, w, t, chunk, bias=b)


def _naive(h, w, t, b):
    return naive_response_logprobs(h, w, t, bias=b)


def _max_errors(chunk: int, h, w, t, b, seed: int = 1) -> list[float]:
    upstream = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = _values_and_grads(_fused(chunk), h, w, t, b, upstream)
    want = _values_and_grads(_naive, h, w, t, b, upstream)
    return [(g.double() - x.double()).abs().max().item() for g, x in zip(got, want, strict=True)]


def test_hand_worked_example() -> None:
    h = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    logp = fused_response_logprobs(h, w, torch.tensor([0]), chunk_size=2)
    e = math.e
    assert logp.item() == pytest.approx(1 - math.log(e + 2), abs=1e-15)
    logp.sum().backward()
    assert h.grad[0].tolist() == pytest.approx([2 / (e + 2), -1 / (e + 2)], abs=1e-15)
    want_w = [2 / (e + 2), 0.0, -1 / (e + 2), 0.0, -1 / (e + 2), 0.0]
    assert w.grad.flatten().tolist() == pytest.approx(want_w, abs=1e-15)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("n", "chunk"), [(5, 2), (4, 8), (6, 1)])
def test_gradcheck_float64(n: int, chunk: int, bias: bool) -> None:
    h, w, t, b = _inputs(n, 3, 7, torch.float64, seed=n, bias=bias)
    inputs = (h, w) + ((b,) if bias else ())

    def fn(h: torch.Tensor, w: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return fused_response_logprobs(h, w, t, chunk, bias=rest[0] if rest else None)

    assert torch.autograd.gradcheck(fn, inputs)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 12),
    v=st.integers(2, 40),
    chunk=st.integers(1, 50),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_float64_equals_naive_on_random_shapes(
    n: int, d: int, v: int, chunk: int, bias: bool, seed: int
) -> None:
    """Covers N < chunk, N == chunk, and N not divisible by chunk; values and every gradient < 1e-9."""
    h, w, t, b = _inputs(n, d, v, torch.float64, seed=seed, bias=bias, scale=3.0)
    assert max(_max_errors(chunk, h, w, t, b, seed)) < 1e-9


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("n", "chunk"), [(50, 16), (7, 64), (64, 64)])
def test_float32_within_1e5_of_float64_naive(n: int, chunk: int, bias: bool) -> None:
    h, w, t, b = _inputs(n, 32, 300, torch.float64, seed=n, bias=bias)
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    b32 = b.detach().float().requires_grad_() if bias else None
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = _values_and_grads(_fused(chunk), h32, w32, t, b32, upstream)
    want = _values_and_grads(_naive, h, w, t, b, upstream)
    assert got[0].dtype == torch.float32
    for g, x in zip(got, want, strict=True):
        assert (g.double() - x).abs().max().item() < 1e-5


@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_matches_naive_within_bf16_tolerance(bias: bool) -> None:
    """bf16 rounds inputs, logits and gradients (8-bit mantissa); log-probs come back in float32."""
    n, chunk = 37, 16
    h, w, t, b = _inputs(n, 32, 300, torch.float64, seed=5, bias=bias, scale=0.3)
    h16, w16 = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    b16 = b.detach().bfloat16().requires_grad_() if bias else None
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = _values_and_grads(_fused(chunk), h16, w16, t, b16, upstream)
    same_dtype_naive = _values_and_grads(_naive, h16, w16, t, b16, upstream)
    exact = _values_and_grads(_naive, h, w, t, b, upstream)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    for g, s, x in zip(got, same_dtype_naive, exact, strict=True):
        g, s, x = g.double(), s.double(), x.double()
        tol = 2**-7 * max(x.abs().max().item(), 1.0)  # two bf16 ulps (8-bit mantissa) of the largest entry
        assert (g - x).abs().max().item() < tol  # bf16 rounding of inputs, logits and gradients
        assert (g - s).abs().max().item() < tol  # vs the same bf16 computation done naively


def test_frozen_weight_gets_no_gradient_and_hidden_still_does() -> None:
    """LoRA: lm_head frozen, gradients only to the hidden states (and through them to the adapters)."""
    h, w, t, _ = _inputs(9, 4, 11, torch.float64)
    w.requires_grad_(False)
    fused_response_logprobs(h, w, t, 4).sum().backward()
    want = torch.autograd.grad(_naive(h, w, t, None).sum(), h)[0]
    assert w.grad is None
    assert (h.grad - want).abs().max().item() < 1e-12


def test_saves_only_inputs_and_one_float_per_row() -> None:
    """No [chunk, V] or [N, V] tensor survives the forward pass for backward."""
    n, d, v = 20, 3, 500
    h, w, t, _ = _inputs(n, d, v, torch.float64)
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(tuple(x.shape)) or x, lambda x: x):
        fused_response_logprobs(h, w, t, 8)
    assert sorted(saved) == sorted([(n, d), (v, d), (n,), (n,)])


def test_empty_input_gives_empty_output_and_zero_grads() -> None:
    h, w, t, _ = _inputs(0, 4, 6, torch.float32)
    out = fused_response_logprobs(h, w, t, 4)
    assert out.shape == (0,)
    out.sum().backward()
    assert h.grad.shape == (0, 4)


def test_rejects_mismatched_shapes_and_dtypes() -> None:
    h, w, t, _ = _inputs(3, 4, 6, torch.float32)
    with pytest.raises(ValueError, match="shape mismatch"):
        fused_response_logprobs(h, w, t[:2])
    with pytest.raises(ValueError, match="share a dtype"):
        fused_response_logprobs(h, w.double(), t)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_response_logprobs(h, w, t, 0)
    with pytest.raises(ValueError, match="bias"):
        fused_response_logprobs(h, w, t, bias=torch.zeros(5))


def test_segment_sum_sums_per_segment_with_gradient() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    out = segment_sum(values, torch.tensor([0, 2, 0, 2]), 4)
    assert out.tolist() == [4.0, 0.0, 6.0, 0.0]
    (out * torch.tensor([1.0, 10.0, 100.0, 1000.0])).sum().backward()
    assert values.grad.tolist() == [1.0, 100.0, 1.0, 100.0]
    with pytest.raises(ValueError):
        segment_sum(values, torch.tensor([0, 1]), 2)


def test_benchmark_case_runs_and_agrees_in_process() -> None:
    """Smoke test of benchmarks/logprob.py's cases at toy size (no subprocess): all losses agree."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.logprob import op_case, seq_case

    methods = ["naive", "fused"]
    try:
        import liger_kernel.chunked_loss  # noqa: F401

        methods.append("liger")
    except ImportError:
        pass
    ops = {m: op_case(m, 64, 8, 50, 16, 4, 0, torch.get_num_threads()) for m in methods}
    for m in methods:
        assert ops[m]["loss"] == pytest.approx(ops["naive"]["loss"], abs=1e-5)
        assert ops[m]["peak"] >= 0
    seqs = {m: seq_case(m, 4, 20, 5, 8, 50, 16, 0, torch.get_num_threads()) for m in ("naive", "fused")}
    assert seqs["fused"]["loss"] == pytest.approx(seqs["naive"]["loss"], abs=1e-5)
