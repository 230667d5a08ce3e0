"""The one interface every generation engine offers: images + rendered prompts in, K responses per item out.

Why one interface: confidence sampling (K samples at temperature T), the refusal-prompt baseline and every
evaluation (greedy, K=1) and the Serve app all ask a model the same question — "what does it say to this
image and this prompt?" — and must get the same chat format and the same post-processing
whichever engine runs (vLLM on GPUs, transformers on CPUs or where vLLM is missing). Engines are plain
classes that satisfy this protocol; there is no base class to inherit from.

Decoding rule shared by all engines: `temperature == 0` is greedy decoding and gives exactly one response
per item (k must be 1); `temperature > 0` samples `k` responses with nucleus `top_p`. Responses are
stripped of surrounding whitespace and special tokens, so graders see the same text from every engine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from PIL import Image


@runtime_checkable
class Sampler(Protocol):
    """A loaded model that answers (image, prompt) pairs; built by `inbol_ray.sampling.build_sampler`.

    Prompts are user texts rendered by `inbol_ray.model.prompt.render_prompt` (instructions included);
    the engine only applies the chat format (`format_prompt`)."""

    engine: str
    """`transformers` or `vllm`: which engine produced the responses (reported in summaries)."""

    def generate(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        *,
        k: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 8,
        seeds: Sequence[int] | None = None,
    ) -> list[list[str]]:
        """`k` responses for each (image, prompt), in input order: result[i] has length k.

        `seeds`: one per item (`item_seed(run seed, item id)`); response j of item i then depends only on
        (seeds[i], j), the model and the decoding settings, never on the other items of the call (None:
        unseeded).
        """
        ...

    def close(self) -> None:
        """Release the model (GPU memory, engine threads); the sampler is unusable afterwards."""
        ...


def check_request(
    images: Sequence[Any], prompts: Sequence[str], k: int, temperature: float, top_p: float
) -> None:
    """Reject requests the engines would treat differently, before any work, with one clear line."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 and k != 1:
        raise ValueError("greedy decoding (temperature 0) gives one response per item; use k=1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def check_seeds(seeds: Sequence[int] | None, n: int) -> None:
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} items; give one seed per item")


def item_seed(seed: int, item_id: str) -> int:
    """The seed of one item: a pure function of the run's seed and the item id (DESIGN.md 1.6).

    Not of the batch, the actor, the shard or the arrival order, so an item sampled in any batch, retried
    alone after an engine error or redone after a crash gets the same samples.
    """
    digest = hashlib.blake2b(f"{int(seed)}\x1f{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31 - 1)


def item_seeds(seed: int, ids: Sequence[str]) -> list[int]:
    return [item_seed(seed, i) for i in ids]
