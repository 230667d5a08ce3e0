"""Short supervised training that turns the random tiny checkpoint into the embedded default's base model.

Why: InBoL needs a base model with an information boundary — items it knows (easy perception, common
invented names) and items it does not (counting, relations, rare names). A brief training on the
*answerable* ShapesWorld pretrain items gives that spread; it never sees a refusal, so, like LLaVA-1.5, it
answers everything. Single process: at this size a Ray Train launch would cost more than the training.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from inbol_ray import schema as S
from inbol_ray.checkpoint import load_model, save_model, upload_dir
from inbol_ray.config import BaseTrainConfig
from inbol_ray.data import io as dio
from inbol_ray.model.batching import encode_prompt_response, pixel_values
from inbol_ray.model.generation import generate_responses


def lr_at(step: int, cfg: BaseTrainConfig) -> float:
    """Linear warm-up then cosine decay to 10%: stable for a from-scratch ViT+LM at a high rate."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_base(
    init_dir: str,
    items: pa.Table,
    out_dir: str,
    cfg: BaseTrainConfig,
    log: Callable[[str], None] = print,
) -> str:
    """Train on the answerable rows of `items` (split `pretrain`) and save an HF checkpoint to `out_dir`.

    `init_dir`, `out_dir`: local paths or URIs (the run layout's `tiny_init` and `base_model`); returns
    `out_dir`.
    """
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model, processor = load_model(init_dir)
    model.train()
    vision = model.model.vision_tower
    if cfg.vision_lr_scale == 0:
        vision.requires_grad_(False)
    train = items.filter(pa.compute.and_(pa.compute.equal(items[S.SPLIT], "pretrain"), items[S.ANSWERABLE]))
    # By id: the order `items` reads back in follows how prepare's Ray Data tasks cut it into files, which
    # varied between runs (1536 of 9500 positions), and the seeded data order is a permutation of rows.
    train = train.sort_by(S.ID)
    if train.num_rows == 0:
        raise ValueError("base training: no answerable rows with split 'pretrain' in items")
    questions = train[S.QUESTION].to_pylist()
    answers = [a[0] for a in train[S.ANSWERS].to_pylist()]
    pv_all = pixel_values(processor, train[S.IMAGE].to_pylist())
    vision_ids = {id(p) for p in vision.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in vision_ids], "scale": 1.0},
        {"params": [p for p in params if id(p) in vision_ids], "scale": cfg.vision_lr_scale},
    ]
    opt = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98)
    )
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(questions))
    pos, t0, ema = 0, time.time(), None
    for step in range(cfg.steps):
        if pos + cfg.batch_size > len(order):
            order, pos = rng.permutation(len(questions)), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        batch = encode_prompt_response(
            processor, pv_all[idx], [questions[i] for i in idx], [answers[i] for i in idx]
        )
        batch.pop("response_mask")
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg) * group["scale"]
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % max(1, cfg.steps // 10) == 0 or step + 1 == cfg.steps:
            log(f"  base training step {step + 1}/{cfg.steps} loss {ema:.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    fs, path = dio.resolve(out_dir)
    if isinstance(fs, pafs.LocalFileSystem):
        save_model(model, processor, path)
    else:  # transformers writes local files only: save, then copy to the object store
        with tempfile.TemporaryDirectory() as tmp:
            upload_dir(save_model(model, processor, tmp), out_dir)
    return out_dir


def family_accuracy(
    model_dir: str,
    items: pa.Table,
    dataset: str,
    rare_names: set[str],
    batch_size: int = 64,
    max_new_tokens: int = 6,
) -> dict[str, tuple[int, float]]:
    """Greedy accuracy per question family on one data set, knowledge split into common / rare names.

    This is the spread the whole method needs; the main job prints it so a user sees the boundary.
    """
    from inbol_ray.grading import grade

    model, processor = load_model(model_dir)
    rows = items.filter(pa.compute.equal(items[S.DATASET], dataset)).to_pylist()
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        outs = generate_responses(
            model,
            processor,
            [r[S.IMAGE] for r in chunk],
            [r[S.QUESTION] for r in chunk],
            max_new_tokens=max_new_tokens,
        )
        for r, (resp,) in zip(chunk, outs, strict=True):
            family = r[S.CATEGORY]
            if family == "knowledge":
                family += "_rare" if r[S.ANSWERS][0] in rare_names else "_common"
            ok = bool(r[S.ANSWERS]) and grade(resp, r[S.ANSWERS], r[S.METRIC])
            hits.setdefault(family, []).append(ok)
    return {fam: (len(v), float(np.mean(v))) for fam, v in sorted(hits.items())}
