"""LLaVA forward from precomputed vision features, so a frozen vision tower runs once per image.

Why: the base training freezes the CLIP tower (`base_train.vision_lr_scale: 0`), yet `model(**batch)` runs
it on every image of every step. Its output does not change during training, so `vision_features` is
computed once per image before the loop and each step only runs the (trainable) projector and the LM.

`vision_features` returns exactly what `LlavaModel.get_image_features` (transformers 5.x) feeds to the
projector: the vision tower's hidden states at `config.vision_feature_layer` (several layers
concatenated when it is a list), without the CLS token under the "default" select strategy.
`input_embeddings` then does what `LlavaModel.forward` does with them before the language model:
project, scatter into the token embeddings at the image-token positions. Unit tests check the features
against `get_image_features` and the loss built on them against `model(**batch)`
(tests/unit/test_base_train.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def vision_features(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """Projector inputs [B, n_image_tokens, D_vision * n_layers] of a LlavaForConditionalGeneration."""
    cfg = model.config
    layer, strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    layers = [layer] if isinstance(layer, int) else list(layer)
    pool = [out.hidden_states[i] for i in layers]
    if strategy == "default":  # drop CLS
        pool = [h[:, 1:] for h in pool]
    elif strategy != "full":
        raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
    return pool[0] if len(pool) == 1 else torch.cat(pool, dim=-1)


@torch.no_grad()
def precompute_vision_features(model: nn.Module, pixel_values: Tensor, batch_size: int = 256) -> Tensor:
    """`vision_features` of every image, in chunks, without autograd (for a frozen tower).

    The tower runs in eval mode (no dropout: the features are a fixed function of the image); its
    training flag is restored afterwards.
    """
    tower = model.model.vision_tower
    was_training = tower.training
    tower.eval()
    try:
        chunks = [
            vision_features(model, pixel_values[i : i + batch_size])
            for i in range(0, len(pixel_values), batch_size)
        ]
    finally:
        tower.train(was_training)
    return torch.cat(chunks)


def input_embeddings(model: nn.Module, input_ids: Tensor, features: Tensor) -> Tensor:
    """The LM's input embeddings [B, T, D]: token embeddings with the projected image features scattered
    into the image-token positions, as `LlavaModel.forward` builds them from `vision_features` [B, n, Dv]
    (one image per row)."""
    llava = model.model
    embeds = llava.get_input_embeddings()(input_ids)
    image = llava.multi_modal_projector(features).to(embeds.dtype)
    mask = input_ids == model.config.image_token_id
    if int(mask.sum()) != image.shape[0] * image.shape[1]:
        raise ValueError(
            f"image tokens and features do not match: {int(mask.sum())} tokens, "
            f"{image.shape[0]} x {image.shape[1]} features"
        )
    return embeds.masked_scatter(mask.unsqueeze(-1), image)
