"""Sampling: one `Sampler` interface over two engines (vLLM, transformers), a Ray Data actor, the stage.

    sampler = build_sampler("vllm", model_dir, cfg.sampling, dtype=cfg.model.dtype,
                            image_aspect=cfg.model.image_aspect, system=cfg.prompt.system)
    prompts = [render_prompt(q, choices, cfg.prompt) for q, choices in ...]  # inbol_ray.model.prompt
    sampler.generate(images, prompts, k=10, temperature=1.0, top_p=0.9, max_new_tokens=8,
                     seeds=item_seeds(cfg.sampling.seed, ids))
    sampler.generate(images, prompts, max_new_tokens=8)  # greedy

`run_sampling` (in `inbol_ray.sampling.stage`) is the confidence-sampling stage: `items` -> `samples`, a thin
user of the generic generate-over-items stage in `inbol_ray.generation`.
"""

from __future__ import annotations

from collections.abc import Callable

from inbol_ray.config import SamplingConfig
from inbol_ray.sampling.base import Sampler, check_request, item_seed, item_seeds


# Engines are imported when one is built: importing this package (for `item_seeds`, say, in a light Ray
# task) must not pull in torch, which costs seconds per fresh worker process on a small machine.
def _transformers(
    model_dir: str, cfg: SamplingConfig, dtype: str, base: str | None, aspect: str, system: str
) -> Sampler:
    from inbol_ray.sampling.hf_engine import HFSampler

    return HFSampler(model_dir, dtype=dtype, base=base, image_aspect=aspect, system=system)


def _vllm(
    model_dir: str, cfg: SamplingConfig, dtype: str, base: str | None, aspect: str, system: str
) -> Sampler:
    from inbol_ray.sampling.vllm_engine import VLLMSampler

    return VLLMSampler(model_dir, cfg, dtype=dtype, base=base, image_aspect=aspect, system=system)


ENGINES: dict[str, Callable[[str, SamplingConfig, str, str | None, str, str], Sampler]] = {
    "transformers": _transformers,
    "vllm": _vllm,
}


def build_sampler(
    engine: str,
    model_dir: str,
    cfg: SamplingConfig | None = None,
    dtype: str = "float32",
    base: str | None = None,
    image_aspect: str = "crop",
    system: str = "",
) -> Sampler:
    """Load `model_dir` with the named engine (`transformers` | `vllm`); engine settings come from `cfg`.

    `model_dir` is any checkpoint location (`inbol_ray.checkpoint.resolve`): a full model, or a LoRA adapter
    on its base (`base` overrides the base the adapter records), local or on object storage. `image_aspect`
    (`model.image_aspect`) shapes every image before the engine's processor sees it; `system`
    (`prompt.system`) opens every LLaVA-format conversation."""
    if engine not in ENGINES:
        raise ValueError(f"unknown sampling engine {engine!r}; expected one of {sorted(ENGINES)}")
    return ENGINES[engine](
        str(model_dir), cfg or SamplingConfig(engine=engine), dtype, base, image_aspect, system
    )


__all__ = [
    "ENGINES",
    "Sampler",
    "build_sampler",
    "check_request",
    "item_seed",
    "item_seeds",
]
