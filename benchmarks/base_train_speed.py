"""Benchmark: the base training's step before and after the speed-up, side by side in one process.

    python -m benchmarks.base_train_speed              # 300 steps on 2000 pretrain items (~2-3 min)
    python -m benchmarks.base_train_speed --quick      # smoke run, numbers mean nothing

Both trainings start from the same tiny checkpoint (configs/tiny.yaml's model) on the same ShapesWorld
items with the same seeded batches, lr schedule and `cfg.threads` torch threads, and are stepped in turn
(old, new, then new, old on the next step...), so machine load hits both alike:

- **old**: the loop `train_base` had before (kept here only, for this comparison): every step encodes its
  batch with `encode_prompt_response`, runs `model(**batch).loss` (vision tower, lm_head and log-softmax
  at every position), for-loop AdamW;
- **new**: `inbol_ray.model.base_train.BaseTraining`, which `train_base` runs: rows encoded once, frozen
  vision tower run once per image before the loop, each batch run in length groups padded to their own
  longest row (ShapesWorld's hint/context questions are ~60 tokens against ~30 for most), last decoder
  layer's query side + lm_head only at the positions that predict answer tokens, fused AdamW.

Printed: time per step (median and mean over steps after the first 5; setup, i.e. loading, image
preprocessing, encoding and the feature pre-pass, separately), the loss curves of both, and the greedy
family accuracy (`family_accuracy`) of both trained models on shapes_id_test.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from benchmarks._measure import environment, format_table

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


class OldBaseTraining:
    """The pre-speed-up `train_base` loop, split like `BaseTraining` (setup / batches / step / save)."""

    def __init__(self, init_dir: str, items: pa.Table, cfg) -> None:
        from inbol_ray import schema as S
        from inbol_ray.checkpoint import load_model
        from inbol_ray.model.batching import pixel_values
        from inbol_ray.model.prompt import render_prompt

        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(cfg.threads)
        self.model, self.processor = load_model(init_dir)
        self.model.train()
        vision = self.model.model.vision_tower
        if cfg.vision_lr_scale == 0:
            vision.requires_grad_(False)
        train = items.filter(
            pa.compute.and_(pa.compute.equal(items[S.SPLIT], "pretrain"), items[S.ANSWERABLE])
        ).sort_by(S.ID)
        # The same rendered prompts the library trains on: both paths must see the same rows.
        self.questions = [
            render_prompt(q, c)
            for q, c in zip(train[S.QUESTION].to_pylist(), train[S.CHOICES].to_pylist(), strict=True)
        ]
        self.answers = [a[0] for a in train[S.ANSWERS].to_pylist()]
        self.pv_all = pixel_values(self.processor, train[S.IMAGE].to_pylist())
        vision_ids = {id(p) for p in vision.parameters()}
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in self.params if id(p) not in vision_ids], "scale": 1.0},
            {"params": [p for p in self.params if id(p) in vision_ids], "scale": cfg.vision_lr_scale},
        ]
        self.opt = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98)
        )

    def batches(self):
        rng = np.random.default_rng(self.cfg.seed)
        order = rng.permutation(len(self.questions))
        pos = 0
        for step in range(self.cfg.steps):
            if pos + self.cfg.batch_size > len(order):
                order, pos = rng.permutation(len(self.questions)), 0
            idx = order[pos : pos + self.cfg.batch_size]
            pos += self.cfg.batch_size
            yield step, idx

    def step(self, step: int, idx: np.ndarray) -> float:
        from inbol_ray.model.base_train import lr_at
        from inbol_ray.model.batching import encode_prompt_response

        batch = encode_prompt_response(
            self.processor,
            self.pv_all[idx],
            [self.questions[i] for i in idx],
            [self.answers[i] for i in idx],
        )
        batch.pop("response_mask")
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, self.cfg) * group["scale"]
        loss = self.model(**batch).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss.item()

    def save(self, out_dir: str) -> str:
        from inbol_ray.checkpoint import save_model

        self.model.eval()
        save_model(self.model, self.processor, out_dir)
        return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--items", type=int, default=2000, help="pretrain items")
    parser.add_argument("--test-items", type=int, default=200, help="shapes_id_test items for accuracy")
    parser.add_argument("--full-steps", type=int, default=None, help="steps to project to (config's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 12 steps, 64 items")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.items, args.test_items = 12, 64, 16

    from inbol_ray.config import load_config
    from inbol_ray.data.shapes import generate_items, invented_names, rare_combos
    from inbol_ray.model.base_train import BaseTraining, family_accuracy
    from inbol_ray.model.tiny import build_tiny_checkpoint
    from inbol_ray.runtime import quiet_env

    quiet_env()
    cfg = load_config(CONFIG)
    full_steps = args.full_steps or cfg.base_train.steps
    shapes_cfg = dataclasses.replace(
        cfg.data.shapes,
        n_pretrain=args.items,
        n_train=0,
        n_val=0,
        n_id_test=args.test_items,
        n_ood_test=0,
        n_unanswerable_test=0,
    )
    train_cfg = dataclasses.replace(
        cfg.base_train, steps=args.steps, warmup_steps=min(cfg.base_train.warmup_steps, args.steps // 3)
    )
    with tempfile.TemporaryDirectory() as tmp:
        init = str(build_tiny_checkpoint(Path(tmp) / "init", cfg.model, cfg.data.shapes))
        items = generate_items(shapes_cfg, cfg.model.image_size)

        setup: dict[str, float] = {}
        t = time.perf_counter()
        old = OldBaseTraining(init, items, train_cfg)
        setup["old"] = time.perf_counter() - t
        t = time.perf_counter()
        new = BaseTraining(init, items, train_cfg)
        setup["new"] = time.perf_counter() - t

        times: dict[str, list[float]] = {"old": [], "new": []}
        losses: dict[str, list[float]] = {"old": [], "new": []}
        runs = {"old": old, "new": new}
        for (step, idx_old), (_, idx_new) in zip(old.batches(), new.batches(), strict=True):
            assert np.array_equal(idx_old, idx_new), "the two loops must see the same batches"
            for name in ("old", "new") if step % 2 == 0 else ("new", "old"):
                start = time.perf_counter()
                losses[name].append(runs[name].step(step, idx_old))
                times[name].append(time.perf_counter() - start)

        names = invented_names(shapes_cfg.n_names, shapes_cfg.seed)
        rare = {names[k] for k in rare_combos(names, shapes_cfg)}
        acc = {}
        for name, run in runs.items():
            out = run.save(str(Path(tmp) / name))
            acc[name] = family_accuracy(
                out, items, "shapes_id_test", rare, max_new_tokens=cfg.eval.max_new_tokens
            )

    skip = min(5, args.steps - 1)
    med = {k: statistics.median(v[skip:]) for k, v in times.items()}
    mean = {k: statistics.fmean(v[skip:]) for k, v in times.items()}
    pair_ratio = statistics.median(
        o / n for o, n in zip(times["old"][skip:], times["new"][skip:], strict=True)
    )
    tail = max(1, min(20, args.steps // 5))
    rows = []
    for name in ("old", "new"):
        rows.append(
            {
                "path": name,
                "setup s": setup[name],
                "ms/step (median)": med[name] * 1e3,
                "ms/step (mean)": mean[name] * 1e3,
                "steps/s": 1 / med[name],
                "speed-up vs old": med["old"] / med[name],
                f"final loss (mean of last {tail})": f"{statistics.fmean(losses[name][-tail:]):.5f}",
                f"projected {full_steps} steps, s": setup[name] + full_steps * med[name],
            }
        )
    env = environment()
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    print(
        f"{args.steps} steps, batch {train_cfg.batch_size}, {args.items} pretrain items, "
        f"torch threads {train_cfg.threads}, interleaved per step (order alternating); timings exclude "
        f"the first {skip} steps; setup = load, image preprocessing (+ encoding and vision pre-pass for new)\n"
    )
    print(format_table(rows, list(rows[0])))
    print(f"\nmedian of per-step time ratios old/new (paired steps): {pair_ratio:.3f}")
    saved = (setup["old"] + full_steps * med["old"]) - (setup["new"] + full_steps * med["new"])
    print(f"projected saving at {full_steps} steps (this machine, this load): {saved:.0f} s")

    every = max(1, args.steps // 10)
    curve = [
        {
            "step": s + 1,
            "old loss": f"{losses['old'][s]:.5f}",
            "new loss": f"{losses['new'][s]:.5f}",
            "abs diff": f"{abs(losses['old'][s] - losses['new'][s]):.1e}",
        }
        for s in sorted({0, *range(every - 1, args.steps, every)})
    ]
    print("\nloss curves (per-step loss of the same batch)\n")
    print(format_table(curve, list(curve[0])))
    max_diff = max(abs(a - b) for a, b in zip(losses["old"], losses["new"], strict=True))
    print(f"max |old - new| over all {args.steps} steps: {max_diff:.2e}")

    fams = sorted(set(acc["old"]) | set(acc["new"]))
    acc_rows = [
        {
            "family": f,
            "n": acc["old"].get(f, (0, 0.0))[0],
            "old acc": f"{acc['old'].get(f, (0, 0.0))[1]:.3f}",
            "new acc": f"{acc['new'].get(f, (0, 0.0))[1]:.3f}",
        }
        for f in fams
    ]
    print("\ngreedy accuracy by family on shapes_id_test after training (family_accuracy)\n")
    print(format_table(acc_rows, list(acc_rows[0])))


if __name__ == "__main__":
    main()
