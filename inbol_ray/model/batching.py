"""Turn (image, prompt, response) rows into model tensors with response-token masks.

A row is the prompt's tokens (`encode_prompts`, exactly what generation feeds the model) followed by the
response's tokens as they follow that prompt (`encode_responses`: the tail of tokens(prompt + response), not
tokens(response) alone, which differ at the seam for SentencePiece tokenizers such as LLaVA-1.5's Llama
one), so the boundary is exact and the response is the token sequence the model emits after the prompt.
Every trainer (base SFT, IDK-IT, DPO), the reference pass and the log-prob helper share this one encoder,
so "response tokens" mean the same thing everywhere.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import torch
from PIL import Image

from inbol_ray.data.images import processor_background, to_model_image
from inbol_ray.model.prompt import format_prompt, format_response

IGNORE_INDEX = -100


def open_rgb(data: bytes | Image.Image) -> Image.Image:
    if isinstance(data, Image.Image):
        return data.convert("RGB")
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def pixel_values(
    processor, images: Sequence[bytes | Image.Image], image_aspect: str = "crop"
) -> torch.Tensor:
    """The processor's pixels of `images`, each first shaped by `model.image_aspect` (see
    `data.images.to_model_image`): every transformers path in LLaVA-1.5's format (training, reference
    pass, sampling, base training) makes its pixels here, so they match what vLLM is given."""
    background = processor_background(processor)
    shaped = [to_model_image(open_rgb(i), image_aspect, background) for i in images]
    return processor.image_processor(images=shaped, return_tensors="pt")["pixel_values"]


def encode_prompts(
    processor, prompts: Sequence[str], has_image: Sequence[bool] | None = None, system: str = ""
) -> list[list[int]]:
    """Token ids of rendered prompts (`prompt.render_prompt`), chat format applied (opened by `system`,
    `prompt.system`), with the image placeholder already expanded to the model's image-token count
    (`has_image[i]` False: a text-only item, no placeholder)."""
    flags = [True] * len(prompts) if has_image is None else list(has_image)
    texts = [format_prompt(p, image, system) for p, image in zip(prompts, flags, strict=True)]
    tok = processor.tokenizer
    n_image = _image_tokens(processor)
    expanded = [t.replace(processor.image_token, processor.image_token * n_image) for t in texts]
    return tok(expanded, add_special_tokens=True)["input_ids"]


def encode_responses(
    tokenizer,
    responses: Sequence[str | None],
    prompts: Sequence[str] | None = None,
    has_image: Sequence[bool] | None = None,
    add_eos: bool = True,
    system: str = "",
) -> list[list[int] | None]:
    """Token ids of each response as it follows its generation prompt, EOS appended (None stays None).

    `prompts[i]` is response i's rendered prompt (`render_prompt`, as `encode_prompts` takes it). Why not
    `tokenizer(format_response(r))`: a SentencePiece tokenizer (LLaVA-1.5's Llama tokenizer) marks a word's
    leading space with '▁' and merges it into the word, and tokenised on its own " B" gets a second,
    leading '▁' from the dummy prefix (sentencepiece itself and the Prepend normaliser of Llama's legacy
    tokenizer.json, which transformers 4 used for llava-hf: ['▁▁', 'B']), while after "ASSISTANT:" the same
    text is ['▁B'], the token LLaVA was trained on and emits. DPO/SFT must score log π of the tokens the
    model would generate after the prompt, so a response's ids are the tail of tokens(prompt + response)
    after tokens(prompt). transformers 5's LlamaTokenizer (Metaspace, prepend_scheme "first") and the tiny
    checkpoint's byte-level BPE happen to give the same ids either way; tests/unit/test_tokenizer_seam.py
    checks all three.

    The prompt is tokenised unexpanded (one image placeholder): the placeholder is an added token, which
    cuts the text around it, so the text after it tokenises the same whatever the number of copies
    `encode_prompts` expands it to. `prompts` None: every response follows the generation prompt of an
    empty user text, which ends like every prompt (" ASSISTANT:"); for callers without the items. Where a
    tokenizer merges the prompt's last token with the response (tokens(prompt) not a prefix of
    tokens(prompt + response); neither the tiny nor a Llama tokenizer does after ":"), no tokenisation of the
    response follows the prompt's tokens: that response is tokenised alone, with a warning.
    """
    present = [i for i, r in enumerate(responses) if r is not None]
    out: list[list[int] | None] = [None] * len(responses)
    if not present:
        return out
    if prompts is not None and len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    flags = [True] * len(responses) if has_image is None else list(has_image)
    contexts = [format_prompt("" if prompts is None else prompts[i], flags[i], system) for i in present]
    texts = [format_response(str(responses[i])) for i in present]
    # Without special tokens: the text's own tokens, no BOS (or EOS) from the post-processor.
    unique = sorted(set(contexts))
    head_of = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"], strict=True))
    full = tokenizer([c + t for c, t in zip(contexts, texts, strict=True)], add_special_tokens=False)
    eos = [tokenizer.eos_token_id] if add_eos else []
    for i, context, text, ids in zip(present, contexts, texts, full["input_ids"], strict=True):
        head = head_of[context]
        if ids[: len(head)] == head:
            out[i] = list(ids[len(head) :]) + eos
        else:
            warnings.warn(
                f"the tokenizer merges the prompt's last token with the response {text!r}: no tokenisation "
                "of it follows the prompt's tokens, so it is tokenised alone",
                stacklevel=2,
            )
            out[i] = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + eos
    return out


def _image_tokens(processor) -> int:
    size = processor.image_processor.crop_size["height"]
    n = (size // processor.patch_size) ** 2 + processor.num_additional_image_tokens
    return n - 1 if processor.vision_feature_select_strategy == "default" else n


def encode_prompt_response(
    processor,
    images: Sequence[bytes | Image.Image] | torch.Tensor,
    prompts: Sequence[str],
    responses: Sequence[str],
    add_eos: bool = True,
    image_aspect: str = "crop",
    system: str = "",
) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, pixel_values, labels, response_mask [B, T].

    Right padding keeps position ids 0..L-1 for the real tokens, as in generation after left padding
    with position ids taken from the attention mask, so training and inference see the same positions.
    `images` may be precomputed pixel values (a [B, 3, H, W] tensor) to skip image preprocessing; others are
    shaped by `image_aspect` (`pixel_values`).
    """
    if not (len(images) == len(prompts) == len(responses)):
        raise ValueError(
            f"batch sizes differ: {len(images)} images, {len(prompts)} prompts, {len(responses)} responses"
        )
    tok = processor.tokenizer
    prompt_ids = encode_prompts(processor, prompts, system=system)
    resp_ids = encode_responses(tok, responses, prompts, add_eos=add_eos, system=system)
    rows, masks = [], []
    for p, r in zip(prompt_ids, resp_ids, strict=True):
        rows.append(p + r)
        masks.append([False] * len(p) + [True] * len(r))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, m) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        response_mask[i, : len(ids)] = torch.tensor(m)
    labels = torch.where(response_mask, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    pv = images if isinstance(images, torch.Tensor) else pixel_values(processor, images, image_aspect)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "pixel_values": pv,
        "labels": labels,
        "response_mask": response_mask,
    }
