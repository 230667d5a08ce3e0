"""Batched transformers generation for LLaVA-style models: greedy answers and K sampled responses.

This is the core of the transformers engine (the CPU path and the fallback where vLLM is missing): the
same prompt text the vLLM engine uses, left padding, one prefill per prompt and K continuations
(`sample_shared_prefill`), greedy decoding being the argmax of the same loop.

Batch invariance (DESIGN.md 1.6): response j of an item must not depend on the other items of its batch.
Two things would make it so, both measured on the tiny model (float32, CPU):
- padding: a row's logits change in the last bits when it is left-padded to a different width (the
  attention's reductions run over more, masked, positions);
- the batch's shape: with 2+ torch threads, a row's logits change when the number of rows changes (the
  GEMMs are split across threads by shape).
Both change a sampled token now and then, and a greedy one on near-ties. So every forward here has a
shape fixed by the item alone: each prompt is left-padded to its length rounded up to `PAD_MULTIPLE`,
rows of one width go through in chunks of exactly `ROWS_PER_FORWARD` (`GREEDY_ROWS_PER_FORWARD` for greedy
decoding; the last chunk filled with copies of its first row, whose outputs are dropped). With fixed shapes
a row's logits are bitwise the same in any batch, in any slot (measured: 0 of 264 rows differ, 1 and 2 threads). Randomness is per row too: sample
j of an item draws its uniforms from a generator seeded by (item seed, j) and picks by inverse CDF.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from PIL import Image

from inbol_ray.model.batching import encode_prompts, pixel_values

PAD_MULTIPLE = 32
"""Prompts are left-padded to a multiple of this many tokens (a width fixed by the prompt alone)."""
ROWS_PER_FORWARD = 8
"""Prompts per forward pass when sampling: a fixed batch shape (changing it may change samples in the last
bits). Each prompt's K continuations decode together, so 8 prompts are already 8K rows per decode step."""
GREEDY_ROWS_PER_FORWARD = 32
"""Prompts per forward pass of greedy decoding (K = 1): at 8 the evaluation was per-call overhead, not
arithmetic; 32 answered 157 items/s against 109 on one thread, the same 512 answers (the tiny model)."""


def clean_response(text: str) -> str:
    """The text graders see, the same from every engine: no U+FFFD, no surrounding whitespace.

    A byte-level tokenizer can emit a token that ends mid UTF-8 character. transformers decodes the
    dangling bytes as U+FFFD; vLLM's incremental detokenizer holds them back and drops them when the
    request ends. Neither is an answer, so both engines drop them and grade the same text.
    """
    return text.replace("\ufffd", "").strip()


def _left_pad(rows: list[list[int]], pad_id: int, width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(width, *(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def stream_seed(seed: int, j: int) -> int:
    """The random stream of continuation j of an item whose seed is `seed`."""
    digest = hashlib.blake2b(f"{int(seed)}\x1f{int(j)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def padded_width(length: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-length // multiple) * multiple


@torch.inference_mode()
def generate_responses(
    model,
    processor,
    images: Sequence[bytes | Image.Image | None],
    prompts: Sequence[str],
    *,
    k: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 8,
    seeds: Sequence[int] | None = None,
    seed: int | None = None,
    image_aspect: str = "crop",
    system: str = "",
) -> list[list[str]]:
    """K responses per (image, rendered prompt); greedy when `do_sample` is False (then K must be 1).

    `seeds`: one per item (see `inbol_ray.sampling.item_seed`); sample j of item i depends only on
    (seeds[i], j), never on the batch. `seed` (when `seeds` is None) seeds items by position instead.
    Neither: unseeded (torch's global generator). An image of None is a text-only item: it is encoded
    without the image placeholder and goes through forwards of text-only rows (no vision tower).
    `image_aspect`: how images are shaped for the vision tower (`model.image_aspect`, `batching.pixel_values`);
    `system`: the conversation's system line (`prompt.system`, `model.prompt.format_prompt`).
    """
    if not do_sample and k != 1:
        raise ValueError("greedy decoding gives one response per prompt; use do_sample=True for k > 1")
    if not prompts:
        return []
    if seeds is None and seed is not None:
        seeds = [stream_seed(seed, -1 - i) for i in range(len(prompts))]
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    tok = processor.tokenizer
    has_image = [image is not None for image in images]
    rows = encode_prompts(processor, prompts, has_image, system)
    with_image = [i for i, h in enumerate(has_image) if h]
    pixels = pixel_values(processor, [images[i] for i in with_image], image_aspect).to(
        model.device, dtype=model.dtype
    ) if with_image else None  # fmt: skip
    pixel_row = {i: n for n, i in enumerate(with_image)}
    # Forwards group rows by (has an image, padded width): both fixed by the item alone.
    by_shape: dict[tuple[bool, int], list[int]] = {}
    for i, row in enumerate(rows):
        by_shape.setdefault((has_image[i], padded_width(len(row))), []).append(i)
    texts: list[list[str]] = [[] for _ in prompts]
    per_forward = ROWS_PER_FORWARD if do_sample else GREEDY_ROWS_PER_FORWARD
    for (image, width), members in sorted(by_shape.items()):
        for start in range(0, len(members), per_forward):
            chunk = members[start : start + per_forward]
            fill = chunk + [chunk[0]] * (per_forward - len(chunk))
            ids, mask = _left_pad([rows[i] for i in fill], tok.pad_token_id, width)
            pv = pixels[[pixel_row[i] for i in fill]] if image else None
            new = sample_shared_prefill(
                model, ids.to(model.device), mask.to(model.device), pv, k, temperature, top_p,
                max_new_tokens, tok.eos_token_id, tok.pad_token_id, greedy=not do_sample,
                seeds=None if seeds is None else [seeds[i] for i in fill], live=len(chunk),
            )  # fmt: skip
            decoded = [
                clean_response(t) for t in tok.batch_decode(new[: len(chunk) * k], skip_special_tokens=True)
            ]
            for n, i in enumerate(chunk):
                texts[i] = decoded[n * k : (n + 1) * k]
    return texts


def encode_batch(
    processor,
    images: Sequence[bytes | Image.Image],
    prompts: Sequence[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    image_aspect: str = "crop",
    system: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids, their attention mask and the pixel values, on the model's device."""
    rows = encode_prompts(processor, prompts, system=system)
    ids, mask = _left_pad(rows, processor.tokenizer.pad_token_id)
    pixels = pixel_values(processor, images, image_aspect)
    return ids.to(device), mask.to(device), pixels.to(device, dtype=dtype)


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
    pixel_values: torch.Tensor | None,
    k: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    greedy: bool = False,
    seeds: Sequence[int] | None = None,
    live: int | None = None,
) -> torch.Tensor:
    """K sampled continuations per prompt, prefilling each prompt (vision tower included) once.

    `generate(num_return_sequences=K)` copies every prompt K times before the prefill, so the image and
    the prompt are encoded K times; with LLaVA's 576 image tokens against a few answer tokens that prefill
    is nearly all the work. Here the prompt's KV cache is computed once and repeated K times, which is what
    vLLM's prefix cache does for `n=K`. Same positions as `generate` under left padding (cumsum of the mask),
    same temperature and top-p rule. Returns the [B*K, <= max_new_tokens] new tokens (pad after EOS).
    `greedy`: argmax instead of sampling (the evaluation's decoding). `seeds` (one per prompt): continuation
    j of prompt i samples from the stream `stream_seed(seeds[i], j)` (None: torch's global generator).
    Prompts from index `live` on are filler (fixed batch shapes, see the module docstring): done from the
    start, their outputs meaningless.
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
    if live is not None:
        done[live * k :] = True
    uniforms = None if greedy else _uniforms(seeds, k, max_new_tokens, mask.shape[0]).to(ids.device)
    tokens = []
    for step in range(max_new_tokens):
        if greedy:
            token = logits.argmax(-1)
        else:
            probs = top_p_filter(logits / temperature, top_p).softmax(-1)
            token = inverse_cdf(probs, uniforms[:, step])
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


def _uniforms(seeds: Sequence[int] | None, k: int, steps: int, rows: int) -> torch.Tensor:
    """[rows, steps] uniforms in [0, 1): row i*k+j from its own generator (seeded by prompt i and j)."""
    if seeds is None:
        return torch.rand(rows, steps, dtype=torch.float64)
    if len(seeds) * k != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows // k} prompts")
    out = torch.empty(rows, steps, dtype=torch.float64)
    for i, s in enumerate(seeds):
        for j in range(k):
            gen = torch.Generator().manual_seed(stream_seed(s, j))
            out[i * k + j] = torch.rand(steps, generator=gen, dtype=torch.float64)
    return out


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row from `probs` [rows, vocab] with the uniforms `u` [rows]: the first index whose
    cumulative probability exceeds u (scaled by the total, so a token of probability 0 is never drawn)."""
    cdf = probs.double().cumsum(-1)
    target = (u.double() * cdf[:, -1]).unsqueeze(-1)
    return (cdf <= target).sum(-1).clamp(max=probs.shape[-1] - 1)
