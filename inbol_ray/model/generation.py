"""Batched transformers generation for LLaVA-style models: greedy answers and K sampled responses.

This is the core of the transformers engine (the CPU path and the fallback where vLLM is missing):
one `generate` call per batch with `num_return_sequences=K`, left padding, and the same prompt text the
vLLM engine uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from inbol_ray.model.batching import encode_prompts, open_rgb


def clean_response(text: str) -> str:
    """The text graders see, the same from every engine: no U+FFFD, no surrounding whitespace.

    A byte-level tokenizer can emit a token that ends mid UTF-8 character. transformers decodes the
    dangling bytes as U+FFFD; vLLM's incremental detokenizer holds them back and drops them when the
    request ends. Neither is an answer, so both engines drop them and grade the same text.
    """
    return text.replace("\ufffd", "").strip()


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


@torch.inference_mode()
def generate_responses(
    model,
    processor,
    images: Sequence[bytes | Image.Image],
    questions: Sequence[str],
    *,
    k: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 8,
    instruction: str | None = None,
    seed: int | None = None,
) -> list[list[str]]:
    """K responses per (image, question); greedy when `do_sample` is False (then K must be 1)."""
    if not do_sample and k != 1:
        raise ValueError("greedy decoding gives one response per prompt; use do_sample=True for k > 1")
    if not questions:
        return []
    tok = processor.tokenizer
    ids, mask = _left_pad(encode_prompts(processor, questions, instruction), tok.pad_token_id)
    pv = processor.image_processor(images=[open_rgb(i) for i in images], return_tensors="pt")["pixel_values"]
    pv = pv.to(model.device, dtype=model.dtype)
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "num_return_sequences": k}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        pixel_values=pv,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        **kwargs,
    )
    texts = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    texts = [clean_response(t) for t in texts]
    return [texts[i * k : (i + 1) * k] for i in range(len(questions))]


def load_model(path: str, dtype: str = "float32", device: str = "cpu"):
    """Load a LLaVA checkpoint and its processor from a local directory, as a user's 7B loads."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    model.eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor
