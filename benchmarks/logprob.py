"""Benchmark: fused response log-prob op vs. naive full log-softmax vs. Liger's chunked DPO loss.

    python -m benchmarks.logprob            # full table (a few minutes on 2 CPU cores)
    python -m benchmarks.logprob --quick    # smoke run in seconds

Why these baselines (DESIGN.md section 4): (a) the naive [N, V] log_softmax + gather is what TRL/OpenRLHF
do; (c) Liger's `LigerFusedLinearDPOLoss` (pure torch with compiled=False) is the chunked alternative a user
would pick. All three compute the same DPO loss (sigmoid, β=0.1, no reference term) from the same hidden
states, lm_head weight and targets, and backpropagate to hidden states and weight; the loss values are
checked against each other. Part two compares full-sequence logits ([B, T, V], what `model(**batch)` gives)
with our response-only rows at LLaVA-1.5-like shapes (576 image tokens + question, 1-10 answer tokens).

Every case runs in a fresh process: peak memory is measured on the first call there (see
benchmarks/_measure.py and benchmarks/README.md), then the median of `--repeats` further calls is timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks._measure import (
    cpu_memory_method,
    environment,
    fmt_bytes,
    format_table,
    median_time,
    peak_memory,
    run_isolated,
)

BETA = 0.1
METHODS = ("naive", "fused", "liger")


def _dpo_loss(seq_logp: Tensor) -> Tensor:
    """Sigmoid DPO without reference (Liger's use_ref_model=False): rows = chosen half, then rejected half."""
    chosen, rejected = seq_logp.chunk(2)
    return -F.logsigmoid(BETA * (chosen - rejected)).sum() / chosen.numel()


def _op_step(method: str, h: Tensor, w: Tensor, t: Tensor, resp_len: int, chunk: int) -> float:
    """One forward + backward of the DPO loss over N = B·resp_len response tokens; returns the loss."""
    from inbol_ray.train.logprob import fused_response_logprobs, naive_response_logprobs

    h.grad = w.grad = None
    if method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        # Liger chunks over sequence pairs: chunk_size pairs × 2 × resp_len rows = our `chunk` rows.
        pairs = max(1, chunk // (2 * resp_len))
        loss_fn = LigerFusedLinearDPOLoss(
            beta=BETA, compiled=False, use_ref_model=False, average_log_prob=False, chunk_size=pairs
        )
        loss = loss_fn(w, h.view(-1, resp_len, h.shape[1]), t.view(-1, resp_len))[0]
    else:
        if method == "naive":
            logp = naive_response_logprobs(h, w, t)
        else:
            logp = fused_response_logprobs(h, w, t, chunk)
        loss = _dpo_loss(logp.view(-1, resp_len).sum(dim=1))
    loss.backward()
    return loss.item()


def op_case(
    method: str, n: int, d: int, v: int, chunk: int, resp_len: int, repeats: int, threads: int
) -> dict:
    """Runs in its own process: memory of the first fwd+bwd, then the median time of `repeats` more."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(n, d, generator=gen) * 0.5).requires_grad_()
    w = (torch.randn(v, d, generator=gen) / d**0.5).requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen)
    # Load the kernels on a small slice so the measured call does not pay one-off library set-up.
    small = 4 * resp_len
    hs, ts = h.detach()[:small].clone().requires_grad_(), t[:small]
    _op_step(method, hs, w, ts, resp_len, chunk)
    w.grad = None
    return _measure_case(lambda: _op_step(method, h, w, t, resp_len, chunk), repeats)


def _measure_case(step: Callable[[], float], repeats: int) -> dict:
    """Peak memory of the first call; median time over that call and `repeats` more."""
    start = time.perf_counter()
    loss, peak = peak_memory(step)
    first = time.perf_counter() - start
    _, times = median_time(step, repeats=repeats, warmup=0) if repeats else (0.0, [])
    return {"loss": loss, "peak": peak, "time": statistics.median([first, *times]), "samples": 1 + len(times)}


def _seq_step(method: str, hidden: Tensor, w: Tensor, ids: Tensor, mask: Tensor, chunk: int) -> float:
    from inbol_ray.train.response_logprobs import (
        naive_response_logprobs_from_logits,
        response_logprobs_from_hidden,
    )

    hidden.grad = w.grad = None
    if method == "naive":
        seq = naive_response_logprobs_from_logits(F.linear(hidden, w), ids, mask)
    else:
        seq = response_logprobs_from_hidden(hidden, ids, mask, w, chunk_size=chunk).per_sequence
    loss = _dpo_loss(seq)
    loss.backward()
    return loss.item()


def _seq_batch(batch: int, prompt_len: int, max_resp: int, v: int) -> tuple[Tensor, Tensor, list[int]]:
    """Right-padded rows: prompt, then 1..max_resp response tokens (lengths cycle so all appear)."""
    gen = torch.Generator().manual_seed(1)
    lens = [1 + (i * 7) % max_resp for i in range(batch)]
    t_len = prompt_len + max_resp
    ids = torch.randint(0, v, (batch, t_len), generator=gen)
    mask = torch.zeros(batch, t_len, dtype=torch.bool)
    for row, r in enumerate(lens):
        mask[row, prompt_len : prompt_len + r] = True
    return ids, mask, lens


def seq_case(
    method: str,
    batch: int,
    prompt_len: int,
    max_resp: int,
    d: int,
    v: int,
    chunk: int,
    repeats: int,
    threads: int,
) -> dict:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    ids, mask, _ = _seq_batch(batch, prompt_len, max_resp, v)
    hidden = (torch.randn(batch, ids.shape[1], d, generator=gen) * 0.5).requires_grad_()
    w = (torch.randn(v, d, generator=gen) / d**0.5).requires_grad_()
    small = hidden.detach()[:2].clone().requires_grad_()
    _seq_step(method, small, w, ids[:2], mask[:2], chunk)
    w.grad = None
    return _measure_case(lambda: _seq_step(method, hidden, w, ids, mask, chunk), repeats)


def _available_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def _naive_need(n_rows: int, v: int) -> int:
    """Naive fwd+bwd holds ~3 float32 [N, V] tensors at its peak (log_softmax out, its grad, gather grad)."""
    return 3 * n_rows * v * 4


def run_ops(args: argparse.Namespace) -> str:
    rows = []
    for n in args.tokens:
        results: dict[str, dict[str, Any]] = {}
        for method in METHODS:
            if method == "naive" and _naive_need(n, args.vocab) > 0.8 * _available_bytes():
                results[method] = {"skip": f"skipped: needs ~{fmt_bytes(_naive_need(n, args.vocab))}"}
                continue
            reps = args.repeats if n <= 8192 else 0
            print(f"  op N={n} {method} ...", file=sys.stderr, flush=True)
            results[method] = run_isolated(
                op_case, method, n, args.hidden, args.vocab, args.chunk, args.resp_len, reps, args.threads
            )
        base = results["naive"]
        block = {
            "naive": n,
            "fused": min(n, args.chunk),
            "liger": 2 * max(1, args.chunk // (2 * args.resp_len)),
        }
        block["liger"] = min(n, block["liger"] * args.resp_len)
        for method in METHODS:
            r = results[method]
            row = {"N": n, "method": method, "logits block": fmt_bytes(block[method] * args.vocab * 4)}
            if "skip" in r:
                row["peak mem"] = r["skip"]
                rows.append(row)
                continue
            row |= {"peak mem": fmt_bytes(r["peak"]), "fwd+bwd s": f"{r['time']:.3f}"}
            if "skip" not in base:
                row["mem vs naive"] = f"{base['peak'] / r['peak']:.1f}x less"
                row["time vs naive"] = f"{r['time'] / base['time']:.2f}x"
                row["loss diff"] = f"{abs(r['loss'] - base['loss']):.1e}"
            rows.append(row)
    cols = [
        "N",
        "method",
        "logits block",
        "peak mem",
        "mem vs naive",
        "fwd+bwd s",
        "time vs naive",
        "loss diff",
    ]
    return format_table(rows, cols)


def run_sequences(args: argparse.Namespace) -> str:
    rows = []
    results = {}
    for method in ("naive", "fused"):
        print(f"  per-sequence {method} ...", file=sys.stderr, flush=True)
        results[method] = run_isolated(
            seq_case,
            method,
            args.seq_batch,
            args.prompt_len,
            args.max_resp,
            args.hidden,
            args.vocab,
            args.chunk,
            args.repeats,
            args.threads,
        )
    _, mask, lens = _seq_batch(args.seq_batch, args.prompt_len, args.max_resp, args.vocab)
    n_resp = sum(lens)
    t_len = mask.shape[1]
    logits_bytes = {
        "naive": args.seq_batch * t_len * args.vocab * 4,
        "fused": min(n_resp, args.chunk) * args.vocab * 4,
    }
    base = results["naive"]
    for method, label in (("naive", "full-sequence logits"), ("fused", "response-only (ours)")):
        r = results[method]
        rows.append(
            {
                "path": label,
                "logits rows": args.seq_batch * t_len if method == "naive" else n_resp,
                "logits memory": fmt_bytes(logits_bytes[method]),
                "logits vs full": f"{logits_bytes['naive'] / logits_bytes[method]:.0f}x less",
                "peak mem": fmt_bytes(r["peak"]),
                "peak vs full": f"{base['peak'] / r['peak']:.1f}x less",
                "fwd+bwd s": f"{r['time']:.3f}",
                "loss diff": f"{abs(r['loss'] - base['loss']):.1e}",
            }
        )
    cols = [
        "path",
        "logits rows",
        "logits memory",
        "logits vs full",
        "peak mem",
        "peak vs full",
        "fwd+bwd s",
        "loss diff",
    ]
    head = (
        f"B={args.seq_batch} rows, T={t_len} (prompt {args.prompt_len} + up to {args.max_resp} response tokens, "
        f"right-padded), responses {min(lens)}-{max(lens)} tokens ({n_resp} in all), D={args.hidden}, V={args.vocab}"
    )
    return head + "\n\n" + format_table(rows, cols)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, one repeat")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 32768], help="N response tokens")
    p.add_argument("--hidden", type=int, default=512, help="D (LLaVA-1.5-7B: 4096; scaled for 2 CPU cores)")
    p.add_argument("--vocab", type=int, default=32000, help="V (LLaVA-1.5: 32000)")
    p.add_argument(
        "--chunk", type=int, default=1024, help="rows per block for our op (and Liger's equivalent)"
    )
    p.add_argument("--resp-len", type=int, default=16, help="tokens per response in the op table")
    p.add_argument(
        "--repeats", type=int, default=2, help="timed calls after the measured one (none above N=8k)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seq-batch", type=int, default=8, help="rows in the per-sequence table")
    p.add_argument("--prompt-len", type=int, default=590, help="576 image tokens + question")
    p.add_argument("--max-resp", type=int, default=10, help="longest response in the per-sequence table")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.vocab, args.chunk = [256, 1024], 64, 4000, 256
        args.repeats, args.seq_batch, args.prompt_len = 0, 4, 100
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment()
    print("# Log-prob op benchmark (benchmarks/logprob.py)\n")
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    print(
        f"memory: {cpu_memory_method()}, first fwd+bwd call in a fresh process; time: median of that call and "
        f"{args.repeats} more (that call only above N=8k)"
    )
    print(
        f"float32, D={args.hidden}, V={args.vocab}, chunk={args.chunk} rows, {args.resp_len} tokens/response\n"
    )
    print(run_ops(args))
    print("\n## Per sequence: full-sequence logits vs. response-only rows\n")
    print(run_sequences(args))


if __name__ == "__main__":
    main()
