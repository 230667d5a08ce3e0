"""Reference log-probs for DPO, computed once in a Ray Data pass and stored as columns of `cadpo_pairs`.

Why precompute: the DPO reference is frozen, so scoring it during training would keep a second model in
memory (or, with LoRA, a second forward with adapters disabled) at every step for numbers that never change.
One pass over the pairs table with an actor pool of scorers writes `ref_logp_{correct,incorrect,refusal}`
(null where a row has no such response), and training reads them like any other column. TRL cannot do this
for vision data (its `precompute_ref_log_probs` path does not carry images through); here the pass uses the
same shared-prefix forward as the policy, so at step 0 of a LoRA run policy and reference agree exactly.

The reference is the base model the policy starts from: for a fresh LoRA run that *is* "the base with
adapters disabled", without building the adapters at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from inbol_ray import schema as S
from inbol_ray.config import Config
from inbol_ray.data import io as dio
from inbol_ray.run_layout import RunLayout
from inbol_ray.train.data import DPO_KINDS, encode_table, make_batch
from inbol_ray.train.loop import torch_threads
from inbol_ray.train.shared_prefix import per_response, shared_prefix_token_logprobs


class ReferenceScorer:
    """Ray Data actor: loads the reference once, adds the ref_logp_* columns to each batch."""

    def __init__(self, model_dir: str, dtype: str, chunk_size: int, micro_batch: int, threads: int) -> None:
        from inbol_ray.checkpoint import load_for_training, load_processor

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_for_training(model_dir, dtype).to(self.device).eval()
        self.processor = load_processor(model_dir)
        self.chunk_size, self.micro_batch = chunk_size, micro_batch
        self.dtype = getattr(torch, dtype)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        enc = encode_table(batch, self.processor, DPO_KINDS)
        parts = []
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for start in range(0, len(enc), self.micro_batch):
            rows = range(start, min(start + self.micro_batch, len(enc)))
            packed, _ = make_batch(enc, rows, self.processor)
            packed = packed.to(self.device, pixel_dtype=self.dtype)
            with autocast:
                token_logps = shared_prefix_token_logprobs(self.model, packed, self.chunk_size)
            parts.append(per_response(token_logps, packed).double().cpu().numpy())
        logps = np.concatenate(parts, axis=0)
        out = batch.select(S.CADPO_PAIRS.names)
        for i, kind in enumerate(DPO_KINDS):
            col = logps[:, i]
            out = out.append_column(S.REF_LOGP[kind], pa.array(col, mask=np.isnan(col), type=pa.float64()))
        return out


def run_reference_pass(
    cfg: Config, layout: RunLayout, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Score `layout.table("cadpo_pairs")` with the frozen reference (`layout.reference_model()`, the DPO
    methods' start model) and write it with ref_logp_* columns to `layout.reference_table()`; return counts.

    The table is written once, whole, at the end, so a crash never leaves a half-written table. Runs on
    max(1, train.num_workers) actors at most (one GPU each when train.use_gpu), one block per actor call,
    `train.reference_batch_size` items per forward (the memory knob of a large model's pass).
    """
    from ray.data import ActorPoolStrategy

    t0 = time.time()
    pairs_uri, model, out_uri = (
        layout.table("cadpo_pairs"),
        layout.reference_model(),
        layout.reference_table(),
    )
    log(f"[reference] {pairs_uri} scored by {model} -> {out_uri}")
    tc = cfg.train
    import ray.data

    # Read in the driver and handed over as blocks: a Parquet listing task wants a whole CPU, which the
    # scorer actors may all hold on a small machine (2 x 0.9 CPUs on 2 cores) and never give back.
    pairs = dio.read_table(pairs_uri, columns=S.CADPO_PAIRS.names)
    n_in = pairs.num_rows
    micro = tc.reference_batch_size or tc.batch_size  # items per forward
    rows = max(tc.batch_size, micro) * 4  # one actor call (as before when micro is batch_size)
    ds = ray.data.from_arrow([pairs.slice(i, rows) for i in range(0, n_in, rows)] or [pairs])
    actors = max(1, min(tc.num_workers, -(-n_in // rows)))  # no more actors than batches
    scored = ds.map_batches(
        ReferenceScorer,
        fn_constructor_kwargs={
            "model_dir": model,
            "dtype": cfg.model.dtype,
            "chunk_size": tc.logprob_chunk_size,
            "micro_batch": micro,
            "threads": torch_threads(tc.cpus_per_worker),
        },
        batch_format="pyarrow",
        batch_size=rows,
        compute=ActorPoolStrategy(size=actors),
        num_cpus=tc.cpus_per_worker if not tc.use_gpu else 1,
        num_gpus=1 if tc.use_gpu else 0,
        accelerator_type=tc.accelerator_type or None,
    )
    # Collected in the driver and written as one table (atomic on every filesystem): Ray Data's write tasks
    # want a CPU that the scorer actors may all hold on a small machine, and a folder move fails on S3.
    parts = list(scored.iter_batches(batch_format="pyarrow", batch_size=None))
    table = pa.concat_tables(parts) if parts else S.CADPO_PAIRS_WITH_REF.empty_table()
    if table.num_rows != n_in:
        raise RuntimeError(f"reference pass lost rows: {n_in} in, {table.num_rows} out")
    table = S.conform(table.sort_by(S.ID), S.CADPO_PAIRS_WITH_REF, "reference pass output")
    dio.remove(out_uri)  # an older run may have left a folder of shards there
    dio.write_table(table, out_uri)
    counts: dict[str, Any] = {"rows": table.num_rows, "seconds": round(time.time() - t0, 1)}
    for kind in DPO_KINDS:
        col = table.column(S.REF_LOGP[kind])
        counts[f"scored_{kind}"] = len(col) - col.null_count
    log(f"[reference] {counts}")
    return counts
