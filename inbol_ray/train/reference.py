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
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from inbol_ray import schema as S
from inbol_ray.config import Config
from inbol_ray.data import io as dio
from inbol_ray.train.data import DPO_KINDS, encode_table, make_batch, read_dataset
from inbol_ray.train.shared_prefix import per_response, shared_prefix_token_logprobs


class ReferenceScorer:
    """Ray Data actor: loads the reference once, adds the ref_logp_* columns to each batch."""

    def __init__(self, model_dir: str, dtype: str, chunk_size: int, micro_batch: int, threads: int) -> None:
        from transformers import AutoProcessor

        from inbol_ray.checkpoint import load_for_training

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_for_training(model_dir, dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
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


def run_reference_pass(cfg: Config, pairs_uri: str, base_model_dir: str, out_uri: str) -> dict[str, Any]:
    """Read `pairs_uri` (cadpo_pairs), write it with ref_logp_* columns to `out_uri`; return counts.

    `out_uri` may equal `pairs_uri`: the result is written beside it and swapped in at the end, so a crash
    never leaves a half-written table. Existing ref columns in the input are recomputed. Runs on
    max(1, train.num_workers) actors (one GPU each when train.use_gpu).
    """
    from ray.data import ActorPoolStrategy

    t0 = time.time()
    pairs_uri, out_uri = dio.absolute(pairs_uri), dio.absolute(out_uri)
    tc = cfg.train
    actors = max(1, tc.num_workers)
    ds = read_dataset(pairs_uri, columns=S.CADPO_PAIRS.names)
    n_in = ds.count()
    scored = ds.map_batches(
        ReferenceScorer,
        fn_constructor_kwargs={
            "model_dir": dio.absolute(base_model_dir),
            "dtype": cfg.model.dtype,
            "chunk_size": tc.logprob_chunk_size,
            "micro_batch": tc.batch_size,
            "threads": max(1, int(tc.cpus_per_worker)),
        },
        batch_format="pyarrow",
        batch_size=tc.batch_size * 4,
        compute=ActorPoolStrategy(size=actors),
        num_cpus=tc.cpus_per_worker if not tc.use_gpu else 1,
        num_gpus=1 if tc.use_gpu else 0,
    )
    tmp = dio.join(dio.parent(out_uri), f".tmp-reference-{uuid.uuid4().hex[:8]}")
    scored.write_parquet(tmp)
    table = dio.read_table(tmp)
    if table.num_rows != n_in:
        dio.remove(tmp)
        raise RuntimeError(f"reference pass lost rows: {n_in} in, {table.num_rows} out")
    S.check_columns(table, S.CADPO_PAIRS_WITH_REF, "reference pass output")
    dio.remove(out_uri)
    fs, tmp_path = dio.resolve(tmp)
    fs.move(tmp_path, dio.resolve(out_uri)[1])
    counts: dict[str, Any] = {"rows": table.num_rows, "seconds": round(time.time() - t0, 1)}
    for kind in DPO_KINDS:
        col = table.column(S.REF_LOGP[kind])
        counts[f"scored_{kind}"] = len(col) - col.null_count
    return counts
