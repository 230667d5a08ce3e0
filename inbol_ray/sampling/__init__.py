"""Sampling: one `Sampler` interface over two engines (vLLM, transformers), a Ray Data actor, the stage.

    sampler = build_sampler("vllm", model_dir, cfg.sampling, dtype=cfg.model.dtype)
    sampler.generate(images, questions, k=10, temperature=1.0, top_p=0.9, max_new_tokens=8,
                     seeds=item_seeds(cfg.sampling.seed, ids))
    sampler.generate(images, questions, max_new_tokens=8, instruction=refusal_instruction)  # greedy

`run_sampling` (in `inbol_ray.sampling.stage`) is the confidence-sampling stage: `items` -> `samples`, a thin
user of the generic generate-over-items stage in `inbol_ray.generation`.
"""

from __future__ import annotations

from collections.abc import Callable

from inbol_ray.config import SamplingConfig
from inbol_ray.sampling.base import Sampler, check_request, item_seed, item_seeds
from inbol_ray.sampling.hf_engine import HFSampler
from inbol_ray.sampling.vllm_engine import VLLMSampler

ENGINES: dict[str, Callable[[str, SamplingConfig, str], Sampler]] = {
    "transformers": lambda model_dir, cfg, dtype: HFSampler(model_dir, dtype=dtype),
    "vllm": lambda model_dir, cfg, dtype: VLLMSampler(model_dir, cfg, dtype=dtype),
}


def build_sampler(
    engine: str, model_dir: str, cfg: SamplingConfig | None = None, dtype: str = "float32"
) -> Sampler:
    """Load `model_dir` with the named engine (`transformers` | `vllm`); engine settings come from `cfg`."""
    if engine not in ENGINES:
        raise ValueError(f"unknown sampling engine {engine!r}; expected one of {sorted(ENGINES)}")
    return ENGINES[engine](str(model_dir), cfg or SamplingConfig(engine=engine), dtype)


__all__ = [
    "ENGINES",
    "HFSampler",
    "Sampler",
    "VLLMSampler",
    "build_sampler",
    "check_request",
    "item_seed",
    "item_seeds",
]
