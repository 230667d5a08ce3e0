"""The transformers engine: batched sampling, one prefill per prompt and K continuations (CPU path, fallback).

A thin wrapper over `inbol_ray.model.generation`, which holds the batching (left padding, the shared
prompt format, fixed batch shapes, per-item random streams); this class only adds the `Sampler` contract: load once, the
greedy/sampling rule of `base.check_request`, and `close`. A checkpoint of another architecture (Qwen2-VL,
...) is asked through its own chat template and processor instead (`model.chat_format.generate_chat`).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

from PIL import Image

from inbol_ray.checkpoint import load_model
from inbol_ray.model.chat_format import generate_chat, image_aspect_for, uses_own_template
from inbol_ray.model.generation import generate_responses
from inbol_ray.sampling.base import check_request, check_seeds


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class HFSampler:
    """`Sampler` over a transformers image-text-to-text model; one instance holds one model."""

    engine = "transformers"

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str = "float32",
        device: str | None = None,
        base: str | None = None,
        image_aspect: str = "crop",
        system: str = "",
    ) -> None:
        self.model_dir = str(model_dir)
        self.model, self.processor = load_model(self.model_dir, dtype, device or default_device(), base)
        self.own_template = uses_own_template(self.model.config.model_type)
        self.image_aspect = image_aspect_for(self.own_template, image_aspect)
        self.system = "" if self.own_template else system  # another architecture: its own template's

    def generate(
        self,
        images: Sequence[Image.Image | None],
        prompts: Sequence[str],
        *,
        k: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 8,
        seeds: Sequence[int] | None = None,
    ) -> list[list[str]]:
        check_request(images, prompts, k, temperature, top_p)
        check_seeds(seeds, len(prompts))
        sampling = temperature > 0
        options = dict(
            k=k,
            do_sample=sampling,
            temperature=temperature if sampling else 1.0,
            top_p=top_p if sampling else 1.0,
            max_new_tokens=max_new_tokens,
            seeds=seeds,
        )
        if self.own_template:
            return generate_chat(self.model, self.processor, images, prompts, **options)
        return generate_responses(
            self.model,
            self.processor,
            images,
            prompts,
            image_aspect=self.image_aspect,
            system=self.system,
            **options,
        )

    def close(self) -> None:
        self.model = self.processor = None
        gc.collect()
