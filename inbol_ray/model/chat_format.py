"""Other architectures' own chat formats: how a checkpoint that is not LLaVA-1.5 is shown an item.

The project trains LLaVA-1.5 and its kin, whose conversation format it writes itself (`model.prompt`), with
batching tuned for batch-invariant sampling (`model.generation`). Scoring *other* vision-language models
(Qwen2-VL, LLaVA-NeXT, Idefics, ...) must not translate the item into some format of ours: each model is
asked the way its makers ask it, through the chat template and processor shipped in its checkpoint. The
user text is still the project's one renderer's (`render_prompt`: the question, lettered options, the
instruction), so every model answers the same words and is graded by the same rules; only the wrapping
(roles, system prompt, image placeholder) is the model's own.

Both engines use `chat_text`: transformers feeds it to the model's processor (which expands the image
placeholder to the image's token count), vLLM takes it as the prompt with the image as `multi_modal_data`
(and expands the placeholder itself), so the two engines see the same text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from PIL import Image

NATIVE_MODEL_TYPES = frozenset({"llava"})
"""Model types the project's own format and batching serve (`model.prompt.format_prompt`)."""


def checkpoint_config(location: str) -> dict:
    """A checkpoint's (an adapter's base's) `config.json`, read without loading the model."""
    from inbol_ray import checkpoint
    from inbol_ray.data import io as dio

    found = checkpoint.resolve(location)
    return json.loads(dio.read_bytes(dio.join(found.model_dir, "config.json")))


def model_type(location: str) -> str:
    """`config.json`'s model_type (`llava`, `qwen2_vl`, ...)."""
    return str(checkpoint_config(location)["model_type"])


def uses_own_template(model_type_name: str) -> bool:
    """True for a checkpoint asked through its own chat template (every architecture but LLaVA-1.5's)."""
    return model_type_name not in NATIVE_MODEL_TYPES


def image_aspect_for(own_template: bool, image_aspect: str) -> str:
    """How a checkpoint's images are shaped before its processor (`data.images.to_model_image`): the run's
    `model.image_aspect` in LLaVA-1.5's format; `crop` (the image left to the processor as shipped) for
    another architecture, whose makers shape images their own way (Qwen2-VL keeps the aspect ratio at its
    own resolution, LLaVA-NeXT tiles): padding would show it pictures it was never shown."""
    return "crop" if own_template else image_aspect


def choose_engine(engine: str, config: dict, vllm_archs: Callable[[], frozenset[str]]) -> str:
    """The engine a checkpoint (its `config.json`) is scored with: the configured one, except that another
    architecture vLLM has no implementation of (none of its `architectures` in `vllm_archs()`, asked only
    when the answer depends on it: it imports vLLM) goes to transformers. Decided before the stage plans,
    so its outputs are labelled and hashed with the engine that made them; the project's own LLaVA
    checkpoints never switch (vLLM failing there is a broken install, and is raised)."""
    if engine != "vllm" or not uses_own_template(str(config["model_type"])):
        return engine
    return engine if set(config.get("architectures") or []) & vllm_archs() else "transformers"


def vllm_architectures() -> frozenset[str]:
    """Every architecture the installed vLLM implements (imports vLLM: run it in a worker process)."""
    from vllm import ModelRegistry

    return frozenset(ModelRegistry.get_supported_archs())


def chat_text(processor, prompt: str, has_image: bool) -> str:
    """The model's own generation prompt for one user turn: its image placeholder (if any), then `prompt`."""
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
    template = getattr(processor, "chat_template", None) or getattr(
        processor.tokenizer, "chat_template", None
    )
    if not template:
        raise ValueError("the checkpoint has no chat template: cannot ask it the way its makers do")
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def generate_chat(
    model,
    processor,
    images: Sequence[Image.Image | None],
    prompts: Sequence[str],
    *,
    k: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 8,
    seeds: Sequence[int] | None = None,
) -> list[list[str]]:
    """K responses per (image or None, rendered prompt) through `model.generate`, one item per call.

    Why one item per call: an item's answer then cannot depend on what else is in the batch (no padding,
    no batch shape; see `model.generation`), and a sampled item draws from a generator seeded by its own
    seed. Throughput for other architectures comes from the vLLM engine, which batches internally.
    """
    import torch

    from inbol_ray.model.generation import clean_response, stream_seed

    tok = processor.tokenizer
    out: list[list[str]] = []
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        text = chat_text(processor, prompt, image is not None)
        enc = processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
        enc = {key: value.to(model.device) for key, value in enc.items()}
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
        extra = {"do_sample": False}
        if do_sample:
            extra = {"do_sample": True, "temperature": temperature, "top_p": top_p, "num_return_sequences": k}
            if seeds is not None:
                torch.manual_seed(stream_seed(seeds[i], 0))
        with torch.inference_mode():
            new = model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **extra
            )[:, enc["input_ids"].shape[1] :]
        out.append([clean_response(t) for t in tok.batch_decode(new, skip_special_tokens=True)])
    return out
