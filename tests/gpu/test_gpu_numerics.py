"""Numerics on the accelerator: the fused log-prob op against the naive one, and a bf16 CA-DPO step against
the same step in float32.

The CPU suite proves both on CPU tensors; what only a GPU shows is CUDA's own kernels (cuBLAS matmuls with
their reduction orders, bf16 autocast as the training loop uses it) and memory: at LLaVA's vocabulary
(32064) the naive op materialises [N, V] float32 logits, the fused one a chunk of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from inbol_ray.train.logprob import fused_response_logprobs, naive_response_logprobs

pytestmark = pytest.mark.gpu

VOCAB = 32064  # LLaVA-1.5's vocabulary


def _inputs(n: int, d: int, v: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.3
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.3
    t = torch.randint(0, v, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen, dtype=torch.float64)
    return h, w, t, upstream


def _run(fn: Callable, h, w, t, upstream, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    h = h.to(device, dtype).requires_grad_()
    w = w.to(device, dtype).requires_grad_()
    out = fn(h, w, t.to(device))
    gh, gw = torch.autograd.grad(out, [h, w], upstream.to(device, out.dtype))
    return [x.detach().double().cpu() for x in (out, gh, gw)]


def _peak_bytes(fn: Callable, device: torch.device) -> int:
    if device.type != "cuda":
        fn()
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_op_on_device_matches_the_naive_op(device: torch.device, dtype: torch.dtype) -> None:
    n, d, chunk = 1024, 256, 1024
    h, w, t, upstream = _inputs(n, d, VOCAB, device, seed=7)
    exact = _run(naive_response_logprobs, h, w, t, upstream, torch.float64, torch.device("cpu"))
    got = _run(lambda a, b, c: fused_response_logprobs(a, b, c, chunk), h, w, t, upstream, dtype, device)
    naive = _run(naive_response_logprobs, h, w, t, upstream, dtype, device)
    # float32: cuBLAS reductions over D=256 and V=32064 terms; bf16: two ulps of an 8-bit mantissa.
    rel = 1e-4 if dtype == torch.float32 else 2**-7
    for name, g, s, x in zip(("logp", "grad_hidden", "grad_weight"), got, naive, exact, strict=True):
        tol = rel * max(x.abs().max().item(), 1.0)
        assert (g - x).abs().max().item() < tol, (name, dtype)
        assert (g - s).abs().max().item() < tol, (name, dtype)
    if device.type == "cuda":
        hh, ww, tt = h.to(device, dtype), w.to(device, dtype), t.to(device)
        fused_peak = _peak_bytes(lambda: fused_response_logprobs(hh, ww, tt, chunk), device)
        naive_peak = _peak_bytes(lambda: naive_response_logprobs(hh, ww, tt), device)
        print(
            f"[gpu] {dtype}: forward peak fused {fused_peak / 2**20:.1f} MiB, naive {naive_peak / 2**20:.1f} MiB"
        )
        assert fused_peak < naive_peak


# --- a CA-DPO step -------------------------------------------------------------------------------------------


def _pairs_table(workdir: Path):
    """Tiny LLaVA checkpoint and a cadpo_pairs table with reference log-probs (built on CPU, float32)."""
    import numpy as np

    from inbol_ray import schema as S
    from inbol_ray.boundary.construct import build_cadpo_pairs
    from inbol_ray.config import ConstructConfig, ModelConfig, ShapesConfig
    from inbol_ray.data.shapes import generate_items
    from inbol_ray.model.prompt import render_prompt
    from inbol_ray.model.tiny import build_tiny_checkpoint
    from inbol_ray.train.reference import ReferenceScorer

    model_cfg = ModelConfig()
    ckpt = build_tiny_checkpoint(workdir / "model", model_cfg)
    shapes = ShapesConfig(
        seed=3, n_pretrain=0, n_train=96, n_val=0, n_id_test=0, n_ood_test=0, n_unanswerable_test=0
    )
    items = generate_items(shapes, model_cfg.image_size)
    items = items.filter(pa.compute.equal(items[S.SPLIT], "train"))
    rng = np.random.default_rng(0)
    k = 4
    rows = items.to_pylist()
    for r in rows:
        gold = r[S.ANSWERS][0] if r[S.ANSWERS] else None
        n_ok = int(rng.integers(0, k + 1)) if gold else 0
        r[S.RESPONSES] = [gold] * n_ok + ["purple"] * (k - n_ok)
        r[S.CORRECT] = [i < n_ok for i in range(k)]
        r[S.REFUSED] = [False] * k
        r[S.CONF] = n_ok / k
        r[S.BUCKET] = "known" if n_ok == k else "unknown" if n_ok == 0 else "mixed"
        r[S.PROMPT] = render_prompt(r[S.QUESTION], r[S.CHOICES])
    built = build_cadpo_pairs(pa.Table.from_pylist(rows), ConstructConfig())
    pairs = S.conform(pa.Table.from_pandas(built.table, preserve_index=False), S.CADPO_PAIRS, "pairs")
    pairs = pairs.slice(0, 16)
    with_ref = ReferenceScorer(str(ckpt), "float32", 1024, micro_batch=16, threads=4)(pairs)
    # The policy starts as the reference, so every margin would be 0 and the loss log 2: shift the reference
    # log-probs so the step sees margins of both signs, as it does once training has moved the policy.
    for column in S.REF_LOGP.values():
        i = with_ref.schema.get_field_index(column)
        ref = with_ref.column(i).to_numpy(zero_copy_only=False)
        shifted = pa.array(ref + rng.normal(0.0, 2.0, len(ref)), pa.float64(), from_pandas=True).cast(
            with_ref.schema.field(i).type
        )
        with_ref = with_ref.set_column(i, with_ref.schema.field(i), shifted)
    return str(ckpt), with_ref


def _step(ckpt: str, table, dtype: str, autocast: bool, device: torch.device):
    """The training loop's micro-step (make_batch, packed forward, CA-DPO objective, backward): loss and
    the LoRA gradients, flattened to float64 on the CPU."""
    from inbol_ray.checkpoint import load_processor
    from inbol_ray.config import TrainConfig
    from inbol_ray.train.data import DPO_KINDS, encode_table, make_batch
    from inbol_ray.train.lora import load_policy
    from inbol_ray.train.objectives import StepNorm, dpo_objective
    from inbol_ray.train.schedule import master_dtype
    from inbol_ray.train.shared_prefix import ResponseScorer

    tc = dataclasses.replace(TrainConfig(), method="cadpo", lora=True, beta=0.1)
    processor = load_processor(ckpt)
    enc = encode_table(table, processor, DPO_KINDS, need_ref=True)
    rows = list(range(len(enc)))
    torch.manual_seed(0)  # LoRA's A matrices: the same in both precisions
    policy = load_policy(ckpt, dtype, tc).to(device)
    scorer = ResponseScorer(policy, tc.logprob_chunk_size)
    packed, values = make_batch(enc, rows, processor)
    packed = packed.to(device, pixel_dtype=getattr(torch, master_dtype(tc, dtype)))
    norm = StepNorm(rows=len(rows), response_tokens=enc.response_tokens(rows), world_size=1)
    ctx = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if autocast else _null()
    with ctx:
        loss, _ = dpo_objective(scorer(packed), packed, values, tc, "cadpo", norm)
    loss.backward()
    grads = torch.cat(
        [p.grad.detach().double().flatten().cpu() for p in scorer.parameters() if p.requires_grad]
    )
    return float(loss.detach()), grads


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_bf16_cadpo_step_matches_float32(device: torch.device, tmp_path: Path) -> None:
    """What the 7B config runs (bf16 weights, LoRA, bf16 autocast as loop.py sets it on CUDA) against the same
    step in float32: the loss within 2%, the LoRA gradient pointing the same way (cosine >= 0.99) and of the
    same size (norm within 5%)."""
    ckpt, table = _pairs_table(tmp_path)
    loss32, g32 = _step(ckpt, table, "float32", autocast=False, device=device)
    loss16, g16 = _step(ckpt, table, "bfloat16", autocast=True, device=device)
    cosine = float(g32 @ g16 / (g32.norm() * g16.norm()))
    ratio = float(g16.norm() / g32.norm())
    print(
        f"[gpu] CA-DPO step: loss float32 {loss32:.5f}, bf16 {loss16:.5f}; grad cosine {cosine:.5f}, norm ratio {ratio:.4f}"
    )
    assert g32.norm() > 0
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    assert cosine >= 0.99
    assert ratio == pytest.approx(1.0, abs=0.05)
