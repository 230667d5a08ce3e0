"""Turn (image, prompt, response) rows into model tensors with response-token masks.

Prompt and response are tokenized separately and concatenated, so the boundary between them is exact
whatever the tokenizer does at the seam; every trainer (base SFT, IDK-IT, DPO) and the log-prob helper
shares this one encoder, so "response tokens" mean the same thing everywhere.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image

from inbol_ray.model.prompt import format_prompt, format_response

IGNORE_INDEX = -100


def open_rgb(data: bytes | Image.Image) -> Image.Image:
    if isinstance(data, Image.Image):
        return data.convert("RGB")
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def pixel_values(processor, images: Sequence[bytes | Image.Image]) -> torch.Tensor:
    return processor.image_processor(images=[open_rgb(i) for i in images], return_tensors="pt")[
        "pixel_values"
    ]


def encode_prompts(
    processor, prompts: Sequence[str], has_image: Sequence[bool] | None = None
) -> list[list[int]]:
    """Token ids of rendered prompts (`prompt.render_prompt`), chat format applied, with the image
    placeholder already expanded to the model's image-token count (`has_image[i]` False: a text-only
    item, no placeholder)."""
    flags = [True] * len(prompts) if has_image is None else list(has_image)
    texts = [format_prompt(p, image) for p, image in zip(prompts, flags, strict=True)]
    tok = processor.tokenizer
    n_image = _image_tokens(processor)
    expanded = [t.replace(processor.image_token, processor.image_token * n_image) for t in texts]
    return tok(expanded, add_special_tokens=True)["input_ids"]


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
) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, pixel_values, labels, response_mask [B, T].

    Right padding keeps position ids 0..L-1 for the real tokens, as in generation after left padding
    with position ids taken from the attention mask, so training and inference see the same positions.
    `images` may be precomputed pixel values (a [B, 3, H, W] tensor) to skip image preprocessing.
    """
    if not (len(images) == len(prompts) == len(responses)):
        raise ValueError(
            f"batch sizes differ: {len(images)} images, {len(prompts)} prompts, {len(responses)} responses"
        )
    tok = processor.tokenizer
    prompt_ids = encode_prompts(processor, prompts)
    resp_ids = tok([format_response(r) for r in responses], add_special_tokens=False)["input_ids"]
    rows, masks = [], []
    for p, r in zip(prompt_ids, resp_ids, strict=True):
        r = r + [tok.eos_token_id] if add_eos else r
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
    pv = images if isinstance(images, torch.Tensor) else pixel_values(processor, images)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "pixel_values": pv,
        "labels": labels,
        "response_mask": response_mask,
    }
