"""What test_train.py's runs are made of: synthetic graded samples, the smoke-run config, run layouts
that share one set of tables, and ways to read a finished run back (its metrics, its saved model).

Plain functions, not fixtures or tests, kept apart so the test module reads as the runs it checks; the
module-scoped trainings stay in test_train.py so that they are built once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from inbol_ray import methods as M
from inbol_ray import schema as S
from inbol_ray.config import Config
from inbol_ray.data import io as dio
from inbol_ray.model.prompt import render_prompt
from inbol_ray.run_layout import RunLayout
from inbol_ray.train.data import DPO_KINDS, encode_table, make_batch, sort_by_id
from inbol_ray.train.shared_prefix import per_response, shared_prefix_token_logprobs
from inbol_ray.train.trainer import TrainResult

ROWS = 32  # per table: batch 8 -> 4 steps per epoch
EPOCHS = 3
K = 4  # synthetic samples per item


def _samples(items: pa.Table, seed: int) -> pa.Table:
    """items joined with synthetic graded samples, spread over known / mixed / unknown."""
    rng = np.random.default_rng(seed)
    rows = items.to_pylist()
    for r in rows:
        gold = r[S.ANSWERS][0] if r[S.ANSWERS] else None
        n_ok = int(rng.integers(0, K + 1)) if gold else 0
        wrong = ["purple", "seven", "zorb blick", "left"][int(rng.integers(0, 4))]
        r[S.PROMPT] = render_prompt(r[S.QUESTION], r[S.CHOICES])  # what sampling would have stored
        r[S.RESPONSES] = [gold] * n_ok + [wrong] * (K - n_ok)
        r[S.CORRECT] = [i < n_ok for i in range(K)]
        r[S.REFUSED] = [False] * K
        r[S.CONF] = n_ok / K
        r[S.BUCKET] = "known" if n_ok == K else "unknown" if n_ok == 0 else "mixed"
    return pa.Table.from_pylist(rows)


def _cfg(tiny_config: Config, **train) -> Config:
    # LoRA: the real-scale path (the tiny default fine-tunes fully, see configs/tiny.yaml). dpo_lr=0 makes
    # every method use lr, so the few smoke steps move the loss measurably for the DPO methods too; pure
    # DPO (sft_weight 0, beta 0.1) so the first step's loss is exactly log 2 (METHOD_OVERRIDES adds NLL).
    base = dict(
        batch_size=8,
        epochs=EPOCHS,
        checkpoint_every=4,
        num_to_keep=2,
        lr=2e-3,
        dpo_lr=0.0,
        beta=0.1,
        sft_weight=0.0,
        num_workers=0,
        lora=True,
        merge=True,  # these tests compare the merged checkpoint with the adapter and the trained policy
    )
    return dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, **{**base, **train}))


def _layout(root: str | Path, tiny_checkpoint: Path) -> RunLayout:
    """Every method starts from (and DPO is anchored to) the tiny checkpoint: dpo_init=base."""
    return RunLayout(root=str(root), model_path=str(tiny_checkpoint), dpo_init="base")


def _run_beside(run_dir: Path, name: str, tiny_checkpoint: Path) -> RunLayout:
    """A second run directory sharing `run_dir`'s tables (its own models/), for runs compared side by side."""
    root = run_dir.parent / f"{run_dir.name}-{name}"
    (root / "tables").mkdir(parents=True, exist_ok=True)
    for table in (run_dir / "tables").iterdir():
        if not (root / "tables" / table.name).exists():
            os.symlink(table, root / "tables" / table.name)
    return _layout(root, tiny_checkpoint)


def _table_for(method: str, run_dir: Path, pairs_with_ref: str) -> str:
    return (
        pairs_with_ref
        if M.method(method).needs_reference
        else str(run_dir / "tables" / M.method(method).table)
    )


def _history(result: TrainResult) -> list[dict]:
    return [json.loads(line) for line in Path(result.metrics_uri).read_text().splitlines()]


def _probe_from_saved_model(model_dir: str, table_uri: str, ids: list[str]) -> np.ndarray:
    """Reload the exported checkpoint with from_pretrained and score the probe rows again."""
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    table = sort_by_id(dio.read_table(table_uri))
    kinds = DPO_KINDS if S.BUCKET in table.column_names else (S.TARGET,)
    enc = encode_table(table, processor, kinds)
    packed, _ = make_batch(enc, [enc.ids.index(i) for i in ids], processor)
    with torch.no_grad():
        return per_response(shared_prefix_token_logprobs(model, packed), packed).double().numpy()


def _copy_run(run_dir: Path, root: Path, tables: tuple[str, ...]) -> None:
    (root / "tables").mkdir(parents=True)
    for name in tables:
        shutil.copy(run_dir / "tables" / name, root / "tables" / name)
