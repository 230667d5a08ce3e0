"""The Ray Data callable class that holds a sampler: `ds.map_batches(GenerateActor, compute=ActorPoolStrategy)`.

Why a callable class: loading a model (or starting a vLLM engine) costs seconds to minutes, so each actor
loads once and then serves many batches; Ray Data sizes the pool (`sampling.num_actors`) and gives each
actor its CPUs/GPUs (`sampling.cpus_per_actor`, `sampling.gpus_per_actor`).

One pass may serve several jobs (`stage.run_generations`: every method of an evaluation over the same
items). Each row names its job (`job` column); the actor holds one model at a time and loads the next when
a row of another job arrives. Rows come job by job, so each actor loads each model about once: far cheaper
than a new actor pool (processes, imports, model load) per job, and never more than one model in memory.

Rows arrive already checked by the CPU stage: a row whose `reason` is set is passed through untouched (it
will be quarantined), so the actor never decodes a bad image. Each item is generated with its own seed
(`item_seed(decoding.seed, id)`), so its responses do not depend on the batch it landed in. A batch that
fails in the engine is retried item by item (same seeds, same responses), and only the items that still
fail are marked with a reason: one prompt the engine rejects (e.g. longer than `max_model_len`) must not
cost its whole batch. If every item fails, the error is raised: that is a broken engine, not bad input.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from inbol_ray.config import SamplingConfig
from inbol_ray.data import io as dio
from inbol_ray.data.images import decode_image
from inbol_ray.sampling import build_sampler
from inbol_ray.sampling.base import item_seeds
from inbol_ray.schema import ID, IMAGE, PROMPT, REASON, RESPONSES

_MAX_REASON = 300
JOB = "job"
"""Pipeline-internal column: the index of the job (model + decoding) a row is generated for."""


@dataclass(frozen=True)
class Decoding:
    """How to answer: K samples at a temperature (confidence) or greedy; `refusal` renders the prompt with
    the refusal-prompt baseline's clause (`prompt.render_prompt`)."""

    k: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    seed: int = 0
    refusal: bool = False

    @classmethod
    def sampled(cls, sampling: SamplingConfig) -> Decoding:
        """The confidence sampling of `sampling` (the prompt training and evaluation use)."""
        s = sampling
        return cls(s.k, s.temperature, s.top_p, s.max_new_tokens, s.seed)

    @classmethod
    def greedy(cls, max_new_tokens: int, refusal: bool = False, seed: int = 0) -> Decoding:
        return cls(1, 0.0, 1.0, max_new_tokens, seed, refusal)


class GenerateActor:
    """Generate `decoding.k` responses per good row of a pyarrow batch; add `responses`, drop `image`.

    `model_dirs[j]` and `decodings[j]` serve the rows whose `job` column is j.
    """

    def __init__(
        self,
        model_dirs: Sequence[str],
        sampling: SamplingConfig,
        decodings: Sequence[Decoding],
        dtype: str = "float32",
        exit_once_marker: str = "",
        image_aspect: str = "crop",
        system: str = "",
    ) -> None:
        import torch

        if len(model_dirs) != len(decodings) or not model_dirs:
            raise ValueError(f"one decoding per model: {len(model_dirs)} models, {len(decodings)} decodings")
        # Each actor gets `cpus_per_actor` cores: two actors on two cores must not each start 2+ threads.
        torch.set_num_threads(max(1, int(sampling.cpus_per_actor)))
        self.model_dirs, self.decodings = list(model_dirs), list(decodings)
        self.sampling, self.dtype, self.image_aspect, self.system = sampling, dtype, image_aspect, system
        self.loaded: int | None = None
        self.sampler = None
        self._load(0)  # the first model now: a broken engine fails at actor start, not mid-stream
        self.exit_once_marker = exit_once_marker
        """Fault-injection hook for tests of Ray Data's retries: when set and the file does not exist yet,
        the first call creates it and kills this actor's process mid-batch (the marker makes it happen once
        across restarts)."""

    def _load(self, job: int) -> None:
        if self.loaded == job:
            return
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
            gc.collect()
        # Any checkpoint location: the engines copy what is on object storage and load an adapter on its
        # base themselves (in memory, or as a vLLM LoRARequest), so no merged copy is ever written.
        self.sampler = build_sampler(
            self.sampling.engine,
            self.model_dirs[job],
            self.sampling,
            self.dtype,
            image_aspect=self.image_aspect,
            system=self.system,
        )
        self.loaded = job

    def __call__(self, batch: pa.Table) -> pa.Table:
        self._maybe_exit()
        good = pc.is_null(batch[REASON]).to_pylist()
        jobs = batch[JOB].to_pylist() if JOB in batch.column_names else [0] * batch.num_rows
        responses: list[list[str]] = [[] for _ in good]
        reasons = batch[REASON].to_pylist()
        ids, images, prompts = (batch[c].to_pylist() for c in (ID, IMAGE, PROMPT))
        # The loaded model's rows first: a batch spanning two jobs loads once, not twice.
        order = sorted(set(jobs), key=lambda j: (j != self.loaded, j))
        for job in order:
            rows = [i for i, ok in enumerate(good) if ok and jobs[i] == job]
            if not rows:
                continue
            self._load(job)
            seeds = item_seeds(self.decodings[job].seed, ids)
            for i, out, why in self._generate_rows(rows, images, prompts, seeds):
                responses[i], reasons[i] = out, why
        out = batch.drop_columns([IMAGE, REASON])
        out = out.append_column(RESPONSES, pa.array(responses, type=pa.list_(pa.string())))
        return out.append_column(REASON, pa.array(reasons, type=pa.string()))

    def _generate(self, images: list[bytes], prompts: list[str], seeds: list[int]) -> list[list[str]]:
        d = self.decodings[self.loaded]
        return self.sampler.generate(
            [None if b is None else decode_image(b) for b in images],  # None: a text-only item
            prompts,
            k=d.k,
            temperature=d.temperature,
            top_p=d.top_p,
            max_new_tokens=d.max_new_tokens,
            seeds=seeds,
        )

    def _generate_rows(
        self, rows: list[int], images: list[bytes], prompts: list[str], seeds: list[int]
    ) -> list[tuple[int, list[str], str | None]]:
        """(row, responses, reason) for each good row: one engine call, item by item only if it fails."""
        try:
            outs = self._generate(
                [images[i] for i in rows], [prompts[i] for i in rows], [seeds[i] for i in rows]
            )
            return [(i, out, None) for i, out in zip(rows, outs, strict=True)]
        except Exception as batch_error:
            results = []
            for i in rows:
                try:
                    (out,) = self._generate([images[i]], [prompts[i]], [seeds[i]])
                    results.append((i, out, None))
                except Exception as exc:
                    results.append((i, [], f"generation failed: {type(exc).__name__}: {exc}"[:_MAX_REASON]))
            if all(why is not None for _, _, why in results):
                raise batch_error
            return results

    def _maybe_exit(self) -> None:
        marker = self.exit_once_marker
        if marker and not dio.exists(marker):
            with open(marker, "w") as f:
                f.write(f"actor pid {os.getpid()} exited here\n")
            os._exit(1)
