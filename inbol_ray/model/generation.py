"""Batched transformers generation for LLaVA-style models: greedy answers and K sampled responses.

This is the core of the transformers engine (the CPU path and the fallback where vLLM is missing):
left padding and the same prompt text the vLLM engine uses; greedy answers through one `generate` call
per batch, K samples per prompt through `sample_shared_prefill` (one prefill per prompt, not K).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from inbol_ray.model.batching import encode_prompts, pixel_values


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
    ids, mask, pv = encode_batch(processor, images, questions, instruction, model.device, model.dtype)
    if seed is not None:
        torch.manual_seed(seed)
    if do_sample and k > 1:
        new = sample_shared_prefill(
            model, ids, mask, pv, k, temperature, top_p, max_new_tokens, tok.eos_token_id, tok.pad_token_id
        )
    else:
        kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        new = model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pv,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **kwargs,
        )[:, ids.shape[1] :]
    texts = [clean_response(t) for t in tok.batch_decode(new, skip_special_tokens=True)]
    return [texts[i * k : (i + 1) * k] for i in range(len(questions))]


def encode_batch(
    processor,
    images: Sequence[bytes | Image.Image],
    questions: Sequence[str],
    instruction: str | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids, their attention mask and the pixel values, on the model's device."""
    rows = encode_prompts(processor, questions, instruction)
    ids, mask = _left_pad(rows, processor.tokenizer.pad_token_id)
    return ids.to(device), mask.to(device), pixel_values(processor, images).to(device, dtype=dtype)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering with transformers' rule (`TopPLogitsWarper`): drop the least likely tokens whose
    cumulative probability stays within 1 - top_p, always keeping the most likely one."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    drop[..., -1:] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def sample_shared_prefill(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    pixel_values: torch.Tensor,
    k: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    greedy: bool = False,
) -> torch.Tensor:
    """K sampled continuations per prompt, prefilling each prompt (vision tower included) once.

    `generate(num_return_sequences=K)` copies every prompt K times before the prefill, so the image and
    the prompt are encoded K times; with LLaVA's 576 image tokens against a few answer tokens that prefill
    is nearly all the work. Here the prompt's KV cache is computed once and repeated K times, which is what
    vLLM's prefix cache does for `n=K`. Same positions as `generate` under left padding (cumsum of the mask),
    same temperature and top-p rule. Returns the [B*K, <= max_new_tokens] new tokens (pad after EOS).
    `greedy` (argmax, for tests) checks the cache handling against `generate`.
    """
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids, attention_mask=mask, pixel_values=pixel_values, position_ids=pos, use_cache=True
    )
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)
    logits = out.logits[:, -1].float().repeat_interleave(k, dim=0)
    mask = mask.repeat_interleave(k, dim=0)
    next_pos = mask.sum(-1, keepdim=True)
    done = torch.zeros(mask.shape[0], dtype=torch.bool, device=ids.device)
    tokens = []
    for step in range(max_new_tokens):
        if greedy:
            token = logits.argmax(-1)
        else:
            probs = top_p_filter(logits / temperature, top_p).softmax(-1)
            token = torch.multinomial(probs, 1).squeeze(-1)
        token = token.masked_fill(done, pad_id)
        tokens.append(token)
        done |= token == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1)
