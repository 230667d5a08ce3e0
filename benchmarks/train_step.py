"""Benchmark: one CA-DPO optimizer step (ours) vs. TRL's DPOTrainer on the equivalent preference pairs.

    python -m benchmarks.train_step            # full table (~5 min on a busy 2-core machine)
    python -m benchmarks.train_step --quick    # smoke run, numbers mean nothing

Same model, same items, same LoRA, same optimizer settings, float32 on CPU, one process per case:
- **ours**: `inbol_ray.train` step on B items of a `cadpo_pairs` table with precomputed reference log-probs
  (`ReferenceScorer`, run once before training; its cost per item is reported separately): one packed row per
  item (image + prompt once, then its 2-3 responses under a block mask), response-only fused log-probs,
  CA-DPO loss (pairs weighted by conf).
- **TRL**: `trl.DPOTrainer` (installed for this benchmark only) on the standard-DPO pairs of the same B items:
  known → (correct ≻ refusal), unknown → (refusal ≻ incorrect), mixed → both (correct ≻ incorrect) and
  (refusal ≻ incorrect), all pairs in one optimizer step. Per pair TRL forwards image + prompt + chosen and
  image + prompt + rejected through the policy, and again with adapters disabled for the reference (TRL refuses
  `precompute_ref_log_probs=True` for vision data). TRL ≥ 1.x already uses a fused, chunked LM head, so the
  difference measured here is the shared prefix and the precomputed reference, not the logits. Two TRL rows:
  `gradient_checkpointing=False` (same autograd as ours) and TRL's default (`True`: less memory, more time).

The model is the project's tiny LLaVA built with a LLaVA-1.5-like image: 384 px / 16 px patches = 576 image
tokens (LLaVA-1.5: 336/14 = 576) before a ~15-token question and 1-6-token answers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from benchmarks._measure import (
    cpu_memory_method,
    environment,
    fmt_bytes,
    format_table,
    peak_memory,
    run_isolated,
)

K_SAMPLES = 4


def _samples(items: pa.Table, seed: int) -> pa.Table:
    """Synthetic graded samples so the items spread over known / mixed / unknown (as in the tests)."""
    from inbol_ray import schema as S

    rng = np.random.default_rng(seed)
    rows = items.to_pylist()
    for r in rows:
        gold = r[S.ANSWERS][0] if r[S.ANSWERS] else None
        n_ok = int(rng.integers(0, K_SAMPLES + 1)) if gold else 0
        wrong = ["purple", "seven", "zorb blick", "left"][int(rng.integers(0, 4))]
        r[S.RESPONSES] = [gold] * n_ok + [wrong] * (K_SAMPLES - n_ok)
        r[S.CORRECT] = [i < n_ok for i in range(K_SAMPLES)]
        r[S.REFUSED] = [False] * K_SAMPLES
        r[S.CONF] = n_ok / K_SAMPLES
        r[S.BUCKET] = "known" if n_ok == K_SAMPLES else "unknown" if n_ok == 0 else "mixed"
    return pa.Table.from_pylist(rows)


def build_inputs(workdir: Path, args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    """Tiny LLaVA with a 576-token image, a cadpo_pairs table of `--items` rows with reference log-probs."""
    from inbol_ray import schema as S
    from inbol_ray.boundary.construct import build_cadpo_pairs
    from inbol_ray.config import ConstructConfig, ModelConfig, ShapesConfig
    from inbol_ray.data import io as dio
    from inbol_ray.data.shapes import generate_items
    from inbol_ray.model.tiny import build_tiny_checkpoint
    from inbol_ray.train.reference import ReferenceScorer

    model_cfg = ModelConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        text_hidden=args.text_hidden,
        text_layers=args.text_layers,
        vision_hidden=128,
        vision_layers=2,
    )
    ckpt = build_tiny_checkpoint(workdir / "model", model_cfg)
    shapes = ShapesConfig(
        seed=1,
        n_pretrain=0,
        n_train=args.items * 3,
        n_val=0,
        n_id_test=0,
        n_ood_test=0,
        n_unanswerable_test=0,
    )
    items = generate_items(shapes, args.image_size)
    items = items.filter(pa.compute.equal(items[S.SPLIT], "train"))
    built = build_cadpo_pairs(_samples(items, seed=1), ConstructConfig())
    pairs = S.conform(pa.Table.from_pandas(built.table, preserve_index=False), S.CADPO_PAIRS, "pairs")
    # The mix the step sees: keep the bucket proportions of the constructed table.
    pairs = pairs.slice(0, args.items)
    scorer = ReferenceScorer(str(ckpt), "float32", 1024, micro_batch=args.items, threads=args.threads)
    t0 = time.perf_counter()
    with_ref = scorer(pairs)
    ref_seconds = time.perf_counter() - t0
    uri = str(workdir / "pairs.parquet")
    dio.write_table(with_ref, uri)
    buckets = Counter(pairs.column(S.BUCKET).to_pylist())
    return str(ckpt), uri, {"ref_seconds": ref_seconds, "buckets": dict(sorted(buckets.items()))}


def _lora_config():
    """The project's default LoRA (regex on the LM's q/k/v/o) for both sides."""
    from peft import LoraConfig

    from inbol_ray.config import TrainConfig

    tc = TrainConfig()
    return tc, LoraConfig(
        r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=0.0, target_modules=tc.lora_target
    )


def ours_step(ckpt: str, pairs_uri: str, steps: int, threads: int, lr: float) -> dict[str, Any]:
    """Fresh process: the training loop's step (make_batch, packed forward, CA-DPO loss, backward, AdamW)."""
    import dataclasses

    import torch
    from transformers import AutoProcessor

    from inbol_ray.checkpoint import load_for_training
    from inbol_ray.data import io as dio
    from inbol_ray.train.data import DPO_KINDS, encode_table, make_batch
    from inbol_ray.train.lora import prepare_policy
    from inbol_ray.train.objectives import StepNorm, dpo_objective
    from inbol_ray.train.shared_prefix import ResponseScorer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tc = dataclasses.replace(_lora_config()[0], lr=lr)
    processor = AutoProcessor.from_pretrained(ckpt)
    enc = encode_table(dio.read_table(pairs_uri), processor, DPO_KINDS, need_ref=True)
    rows = list(range(len(enc)))
    scorer = ResponseScorer(prepare_policy(load_for_training(ckpt), tc))
    times: list[float] = []
    losses: list[float] = []
    tokens = 0

    def run() -> None:
        nonlocal tokens
        opt = torch.optim.AdamW([p for p in scorer.parameters() if p.requires_grad], lr=tc.lr)
        norm = StepNorm(rows=len(rows), response_tokens=0, world_size=1)
        for _ in range(steps):
            t0 = time.perf_counter()
            packed, values = make_batch(enc, rows, processor)
            loss, _ = dpo_objective(scorer(packed), packed, values, tc, "cadpo", norm)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in scorer.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            tokens = packed.num_tokens

    _, peak = peak_memory(run)
    return {"step_s": statistics.median(times[1:]), "peak": peak, "loss1": losses[0], "tokens": tokens}


def _trl_pairs(pairs_uri: str, eos: str) -> list[dict[str, Any]]:
    """Standard-DPO rows (images, prompt, chosen, rejected) equivalent to the CA-DPO rows' pairs."""
    from inbol_ray import schema as S
    from inbol_ray.data import io as dio
    from inbol_ray.model.batching import open_rgb
    from inbol_ray.model.prompt import format_prompt, format_response
    from inbol_ray.train.losses import _PAIR_BUCKETS, BUCKET_CODES, PAIRS

    out = []
    for row in dio.read_table(pairs_uri).to_pylist():
        code = BUCKET_CODES[row[S.BUCKET]]
        for pair, (chosen, rejected) in PAIRS.items():
            if code in _PAIR_BUCKETS[pair]:
                out.append(
                    {
                        "images": [open_rgb(row[S.IMAGE])],
                        # BOS and EOS spelled out: TRL tokenizes with add_special_tokens=False and adds no EOS
                        # to raw-text completions, and our encoder has both.
                        "prompt": "<s>" + format_prompt(row[S.PROMPT]),
                        "chosen": format_response(row[chosen]) + eos,
                        "rejected": format_response(row[rejected]) + eos,
                    }
                )
    return out


def trl_step(
    ckpt: str, pairs_uri: str, steps: int, threads: int, lr: float, checkpointing: bool
) -> dict[str, Any]:
    """Fresh process: TRL's DPOTrainer, LoRA via peft_config (reference = adapters disabled), one step = all pairs."""
    import torch
    from datasets import Dataset
    from transformers import AutoProcessor, PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from inbol_ray.checkpoint import load_for_training

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tc, lora = _lora_config()
    processor = AutoProcessor.from_pretrained(ckpt)
    rows = _trl_pairs(pairs_uri, processor.tokenizer.eos_token)
    ends: list[float] = []
    losses: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN003
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=len(rows),
            gradient_accumulation_steps=1,
            max_steps=steps,
            learning_rate=lr,
            lr_scheduler_type="constant",
            beta=tc.beta,
            max_length=None,  # never cut image tokens
            max_grad_norm=1.0,
            gradient_checkpointing=checkpointing,
            bf16=False,
            use_cpu=True,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = DPOTrainer(
            model=load_for_training(ckpt),
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=processor,
            peft_config=lora,
            callbacks=[StepClock()],
        )
        trainer.remove_callback(PrinterCallback)  # keep stdout for the table
        _, peak = peak_memory(trainer.train)
    gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {
        "step_s": statistics.median(gaps),
        "peak": peak,
        "loss1": losses[0] if losses else float("nan"),
        "pairs": len(rows),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small image, 2 items, 2 steps")
    p.add_argument("--items", type=int, default=8, help="CA-DPO rows per optimizer step")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per case (the first is not timed)")
    p.add_argument("--image-size", type=int, default=384, help="384/16 -> 576 image tokens, as LLaVA-1.5")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--text-hidden", type=int, default=256, help="LM width (scaled for 2 CPU cores)")
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch threads in every case")
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args(argv)
    if args.quick:
        args.items, args.steps, args.image_size = 2, 2, 64
    return args


def main(argv: list[str] | None = None) -> None:
    from inbol_ray.runtime import quiet_env

    quiet_env()
    args = parse_args(argv)
    env = environment()
    print("# Training step benchmark (benchmarks/train_step.py)\n")
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    import trl

    n_image = (args.image_size // args.patch_size) ** 2
    print(
        f"trl: {trl.__version__} | model: tiny LLaVA, {n_image} image tokens, LM {args.text_layers}x{args.text_hidden}, "
        f"LoRA r=16 on q/k/v/o of the LM, float32 | {args.items} CA-DPO rows per step, {args.steps} steps "
        f"(median of steps 2..n) | peak memory: {cpu_memory_method()}, per case in a fresh process\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, pairs_uri, info = build_inputs(Path(tmp), args)
        common = (ckpt, pairs_uri, args.steps, args.threads, args.lr)
        results = {}
        for name, fn, extra in (
            ("ours", ours_step, ()),
            ("trl_nockpt", trl_step, (False,)),
            ("trl_default", trl_step, (True,)),
        ):
            print(f"  running {name} ...", file=sys.stderr, flush=True)
            results[name] = run_isolated(fn, *common, *extra)
    ref_per_step = info["ref_seconds"]  # one no-grad pass over the step's items, paid once per training run
    mine = results["ours"]
    pairs = results["trl_nockpt"]["pairs"]
    rows = [
        {
            "case": "ours: CA-DPO, shared prefix, precomputed reference",
            "work per step": f"{args.items} items ({pairs} pairs), {args.items} packed rows",
            "time/step (s)": mine["step_s"],
            "peak mem": fmt_bytes(mine["peak"]),
            "loss@1": mine["loss1"],
            "time vs ours": 1.0,
            "mem vs ours": 1.0,
        }
    ]
    for key, label in (
        ("trl_nockpt", "TRL DPOTrainer, gradient_checkpointing=False"),
        ("trl_default", "TRL DPOTrainer, defaults (gradient_checkpointing=True)"),
    ):
        r = results[key]
        rows.append(
            {
                "case": label,
                "work per step": f"{r['pairs']} pairs = {2 * r['pairs']} sequences x (policy + reference)",
                "time/step (s)": r["step_s"],
                "peak mem": fmt_bytes(r["peak"]),
                "loss@1": r["loss1"],
                "time vs ours": r["step_s"] / mine["step_s"],
                "mem vs ours": r["peak"] / mine["peak"],
            }
        )
    cols = ["case", "work per step", "time/step (s)", "peak mem", "loss@1", "time vs ours", "mem vs ours"]
    print(format_table(rows, cols))
    print(
        f"\nReference log-probs (ours, once per item, before training): {ref_per_step:.3f} s for the step's "
        f"{args.items} items = {ref_per_step / mine['step_s']:.2f} of one of our steps, paid once per run (E epochs "
        f"share it). Buckets of the step's items: {info['buckets']}. "
        f"loss@1 is log 2 = 0.693 for both (policy = reference at LoRA init)."
    )


if __name__ == "__main__":
    main()
