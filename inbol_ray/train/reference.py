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
import pyarrow.compute as pc
import torch

from inbol_ray import schema as S
from inbol_ray.config import Config
from inbol_ray.data import io as dio
from inbol_ray.run_layout import RunLayout
from inbol_ray.train.data import DPO_KINDS, encode_table, make_batch
from inbol_ray.train.loop import torch_threads
from inbol_ray.train.shared_prefix import per_response, shared_prefix_token_logprobs
from inbol_ray.train.table_rows import TableBlocks, open_blocks


class ReferenceScorer:
    """Ray Data actor: loads the reference once, adds the ref_logp_* columns to each batch."""

    def __init__(
        self,
        model_dir: str,
        dtype: str,
        chunk_size: int,
        micro_batch: int,
        threads: int,
        image_aspect: str = "crop",
        system: str = "",
    ) -> None:
        from inbol_ray.checkpoint import load_for_training, load_processor

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_for_training(model_dir, dtype).to(self.device).eval()
        self.processor = load_processor(model_dir)
        self.chunk_size, self.micro_batch, self.image_aspect = chunk_size, micro_batch, image_aspect
        self.system = system
        self.dtype = getattr(torch, dtype)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        enc = encode_table(batch, self.processor, DPO_KINDS, system=self.system)
        parts = []
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for start in range(0, len(enc), self.micro_batch):
            rows = range(start, min(start + self.micro_batch, len(enc)))
            packed, _ = make_batch(enc, rows, self.processor, self.image_aspect)
            packed = packed.to(self.device, pixel_dtype=self.dtype)
            with autocast:
                token_logps = shared_prefix_token_logprobs(self.model, packed, self.chunk_size)
            parts.append(per_response(token_logps, packed).double().cpu().numpy())
        logps = np.concatenate(parts, axis=0)
        out = batch.select(S.CADPO_PAIRS.names + [c for c in (BLOCK, POSITION) if c in batch.column_names])
        for i, kind in enumerate(DPO_KINDS):
            col = logps[:, i]
            out = out.append_column(S.REF_LOGP[kind], pa.array(col, mask=np.isnan(col), type=pa.float64()))
        return out


def empty_table_error(table_uri: str, who: str, table: str) -> ValueError:
    """The error for a training table with no rows, naming where the rows went.

    Why its own message: an empty table used to reach the Ray Train workers, fail in each of them and be
    retried `train.max_failures` times, ending in an "empty table" far from its cause, which is always
    upstream: construct dropped every row (its quarantine says why) or had none to start from. Tables live
    at `<run>/tables/<name>`, so the construct quarantine is found beside them when the layout is a run's.
    """
    run_dir = dio.parent(dio.parent(table_uri))
    quarantine = dio.quarantine_uri(run_dir, f"construct_{table}")
    where = quarantine if dio.exists(quarantine) else f"the construct stage's quarantine (construct_{table})"
    return ValueError(
        f"{who}: training table {table_uri} has 0 rows, nothing to train on. Construct kept 0 rows for "
        f"'{table}': either it dropped every row (each one and its reason is in {where}) or it had no "
        f"input (check the sample and prepare stages' counts and the construct.* settings)."
    )


BLOCK, POSITION = "_block", "_position"
"""Where a row came from (row group of the pairs table, place in it): the driver puts each block back
together and writes it as its own file, in the input's order."""


def read_block(batch: pa.Table, table: TableBlocks) -> pa.Table:
    """Ray Data task: the pairs table's row group named in `batch`, with its block and row positions."""
    parts = []
    for b in batch.column(BLOCK).to_pylist():
        rows = table.read(b, columns=S.CADPO_PAIRS.names)
        rows = rows.append_column(BLOCK, pa.array(np.full(rows.num_rows, b), pa.int64()))
        parts.append(rows.append_column(POSITION, pa.array(np.arange(rows.num_rows), pa.int64())))
    return pa.concat_tables(parts)


def run_reference_pass(
    cfg: Config, layout: RunLayout, *, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Score `layout.table("cadpo_pairs")` with the frozen reference (`layout.reference_model()`, the DPO
    methods' start model) and write it with ref_logp_* columns to `layout.reference_table()`; return counts.

    Streams: the pairs table goes through by row groups (read by light tasks, scored by the actor pool), and
    the driver writes each input row group as its own output file once all its rows are back, so it holds
    only the row groups in flight, never the table. Files are written under hidden names and renamed when
    every one is written (a file move works on object storage; a folder move does not), so a crash never
    leaves a table that looks complete. Output order = input order (row group by row group). Runs on
    max(1, train.num_workers) actors at most (one GPU each when train.use_gpu), `train.reference_batch_size`
    items per forward (the memory knob of a large model's pass). A pairs table without rows fails here,
    before any actor starts, and leaves no reference table behind (`empty_table_error`).
    """
    import ray.data
    from ray.data import ActorPoolStrategy

    from inbol_ray.generation.stage import light_tasks

    t0 = time.time()
    pairs_uri, model, out_uri = (
        layout.table("cadpo_pairs"),
        layout.reference_model(),
        layout.reference_table(),
    )
    log(f"[reference] {pairs_uri} scored by {model} -> {out_uri}")
    tc = cfg.train
    blocks = open_blocks(pairs_uri, allow_empty=True)  # footers only
    n_in = blocks.n_rows
    dio.remove(out_uri)  # an older run may have left a file or a folder there
    if n_in == 0:  # no DPO method can train on it: say so now, not after every worker's retries
        raise empty_table_error(pairs_uri, "reference pass", "cadpo_pairs")
    micro = tc.reference_batch_size or tc.batch_size  # items per forward
    rows = max(tc.batch_size, micro) * 4  # one actor call
    actors = max(1, min(tc.num_workers, -(-n_in // rows)))  # no more actors than batches
    # Read units as items, not `ray.data.read_parquet`: its listing task wants a whole CPU, which the scorer
    # actors may all hold on a small machine; the light read tasks ask for none.
    units = [{BLOCK: b} for b in range(len(blocks.blocks))]
    scored = (
        ray.data.from_items(units, override_num_blocks=len(units))
        .map_batches(
            read_block,
            fn_kwargs={"table": blocks},  # the footers read once here, not once per task
            batch_format="pyarrow",
            batch_size=1,
            num_cpus=0,
            compute=ray.data.TaskPoolStrategy(size=min(light_tasks(), len(units))),
        )
        .map_batches(
            ReferenceScorer,
            fn_constructor_kwargs={
                "model_dir": model,
                "dtype": cfg.model.dtype,
                "chunk_size": tc.logprob_chunk_size,
                "micro_batch": micro,
                "threads": torch_threads(tc.cpus_per_worker),
                "image_aspect": cfg.model.image_aspect,
                "system": cfg.prompt.system,
            },
            batch_format="pyarrow",
            batch_size=rows,
            compute=ActorPoolStrategy(size=actors),
            num_cpus=tc.cpus_per_worker if not tc.use_gpu else 1,
            num_gpus=1 if tc.use_gpu else 0,
            accelerator_type=tc.accelerator_type or None,
        )
    )
    pending: dict[int, list[pa.Table]] = {}
    written: list[str] = []
    counts: dict[str, Any] = {"rows": 0, **{f"scored_{kind}": 0 for kind in DPO_KINDS}}
    for batch in scored.iter_batches(batch_format="pyarrow", batch_size=None):
        for b in sorted(set(batch.column(BLOCK).to_pylist())):
            pending.setdefault(b, []).append(batch.filter(pc.equal(batch.column(BLOCK), b)))
            if sum(t.num_rows for t in pending[b]) < blocks.blocks[b].rows:
                continue
            part = pa.concat_tables(pending.pop(b)).sort_by(POSITION).drop_columns([BLOCK, POSITION])
            if part.num_rows != blocks.blocks[b].rows:
                raise RuntimeError(f"reference pass: row group {b} came back with {part.num_rows} rows")
            part = S.conform(part, S.CADPO_PAIRS_WITH_REF, "reference pass output")
            hidden = dio.join(out_uri, f".pending-part-{b:06d}.parquet")
            dio.write_table(part, hidden)
            written.append(hidden)
            counts["rows"] += part.num_rows
            for kind in DPO_KINDS:
                col = part.column(S.REF_LOGP[kind])
                counts[f"scored_{kind}"] += len(col) - col.null_count
    if pending or counts["rows"] != n_in:
        raise RuntimeError(f"reference pass lost rows: {n_in} in, {counts['rows']} out")
    fs, _ = dio.resolve(out_uri)
    for hidden in written:
        fs.move(dio.resolve(hidden)[1], dio.resolve(hidden.replace("/.pending-part-", "/part-"))[1])
    counts["seconds"] = round(time.time() - t0, 1)
    log(f"[reference] {counts}")
    return counts
