"""The Ray Data callable class that holds one sampler: `ds.map_batches(SamplerActor, compute=ActorPoolStrategy)`.

Why a callable class: loading a model (or starting a vLLM engine) costs seconds to minutes, so each actor
loads once in `__init__` and then serves many batches; Ray Data sizes the pool (`sampling.num_actors`) and
gives each actor its CPUs/GPUs (`sampling.cpus_per_actor`, `sampling.gpus_per_actor`).

Rows arrive already checked by the CPU stage: a row whose `reason` is set is passed through untouched (it
will be quarantined), so the actor never decodes a bad image. A batch that fails in the engine is retried
item by item, and only the items that still fail are marked with a reason: one prompt the engine rejects
(e.g. longer than `max_model_len`) must not cost its whole batch. If every item fails, the error is raised:
that is a broken engine, not bad input.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from inbol_ray.config import SamplingConfig
from inbol_ray.data.images import decode_image
from inbol_ray.sampling import build_sampler
from inbol_ray.sampling.base import batch_seed
from inbol_ray.schema import ID, IMAGE, QUESTION, REASON, RESPONSES

_MAX_REASON = 300


class SamplerActor:
    """Sample `cfg.k` responses per good row of a pyarrow batch; add a `responses` column, drop `image`."""

    def __init__(
        self, model_dir: str, cfg: SamplingConfig, dtype: str = "float32", exit_once_marker: str = ""
    ) -> None:
        self.cfg = cfg
        self.sampler = build_sampler(cfg.engine, model_dir, cfg, dtype)
        self.exit_once_marker = exit_once_marker
        """Fault-injection hook for tests of Ray Data's retries: when set and the file does not exist yet,
        the first call creates it and kills this actor's process mid-batch (the marker makes it happen once
        across restarts)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        self._maybe_exit()
        good = pc.is_null(batch[REASON]).to_pylist()
        rows = [i for i, ok in enumerate(good) if ok]
        responses: list[list[str]] = [[] for _ in good]
        reasons = batch[REASON].to_pylist()
        if rows:
            ids = batch[ID].to_pylist()
            images = batch[IMAGE].to_pylist()
            questions = batch[QUESTION].to_pylist()
            seed = batch_seed(self.cfg.seed, [ids[i] for i in rows])
            for i, sampled, why in self._sample(rows, images, questions, seed):
                responses[i], reasons[i] = sampled, why
        out = batch.drop_columns([IMAGE, REASON])
        out = out.append_column(RESPONSES, pa.array(responses, type=pa.list_(pa.string())))
        return out.append_column(REASON, pa.array(reasons, type=pa.string()))

    def _generate(self, images: list[bytes], questions: list[str], seed: int) -> list[list[str]]:
        c = self.cfg
        return self.sampler.generate(
            [decode_image(b) for b in images],
            questions,
            k=c.k,
            temperature=c.temperature,
            top_p=c.top_p,
            max_new_tokens=c.max_new_tokens,
            seed=seed,
        )

    def _sample(
        self, rows: list[int], images: list[bytes], questions: list[str], seed: int
    ) -> list[tuple[int, list[str], str | None]]:
        """(row, responses, reason) for each good row: one engine call, item by item only if it fails."""
        try:
            outs = self._generate([images[i] for i in rows], [questions[i] for i in rows], seed)
            return [(i, out, None) for i, out in zip(rows, outs, strict=True)]
        except Exception as batch_error:
            results = []
            for i in rows:
                try:
                    (out,) = self._generate([images[i]], [questions[i]], seed + i)
                    results.append((i, out, None))
                except Exception as exc:
                    results.append((i, [], f"sampling failed: {type(exc).__name__}: {exc}"[:_MAX_REASON]))
            if all(why is not None for _, _, why in results):
                raise batch_error
            return results

    def _maybe_exit(self) -> None:
        marker = self.exit_once_marker
        if marker and not Path(marker).exists():
            Path(marker).write_text(f"actor pid {os.getpid()} exited here\n")
            os._exit(1)
