"""The one interface every generation engine offers: images + questions in, K responses per item out.

Why one interface: confidence sampling (K samples at temperature T), the refusal-prompt baseline and every
evaluation (greedy, K=1, optional instruction) and the Serve app all ask a model the same question — "what
does it say to this image and this question?" — and must get the same prompt and the same post-processing
whichever engine runs (vLLM on GPUs, transformers on CPUs or where vLLM is missing). Engines are plain
classes that satisfy this protocol; there is no base class to inherit from.

Decoding rule shared by all engines: `temperature == 0` is greedy decoding and gives exactly one response
per item (k must be 1); `temperature > 0` samples `k` responses with nucleus `top_p`. Responses are
stripped of surrounding whitespace and special tokens, so graders see the same text from every engine.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from PIL import Image


@runtime_checkable
class Sampler(Protocol):
    """A loaded model that answers (image, question) pairs; built by `inbol_ray.sampling.build_sampler`."""

    engine: str
    """`transformers` or `vllm`: which engine produced the responses (reported in summaries)."""

    def generate(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        *,
        k: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 8,
        seed: int | None = None,
        instruction: str | None = None,
    ) -> list[list[str]]:
        """`k` responses for each (image, question), in input order: result[i] has length k.

        `seed` makes a call reproducible for the same inputs (same batch, same engine); `instruction` is
        appended to every question (the refusal-prompt baseline) through `format_prompt`.
        """
        ...

    def close(self) -> None:
        """Release the model (GPU memory, engine threads); the sampler is unusable afterwards."""
        ...


def check_request(
    images: Sequence[Any], questions: Sequence[str], k: int, temperature: float, top_p: float
) -> None:
    """Reject requests the engines would treat differently, before any work, with one clear line."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 and k != 1:
        raise ValueError("greedy decoding (temperature 0) gives one response per item; use k=1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def batch_seed(base_seed: int, ids: Sequence[str]) -> int:
    """A seed for one batch, fixed by the run's seed and the batch's item ids.

    Ray Data forms batches nondeterministically, so a seed counted per call would change between runs;
    deriving it from the ids means a batch that is retried after an actor dies samples with the same seed.
    """
    digest = zlib.crc32("\x1f".join(sorted(ids)).encode())
    return (base_seed * 1_000_003 + digest) % (2**31 - 1)
