"""Response-only log-probs on the tiny LLaVA equal gathering from `model(**batch).logits`, grads included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from inbol_ray.model.batching import encode_prompt_response
from inbol_ray.train.response_logprobs import (
    backbone_hidden,
    naive_response_logprobs_from_logits,
    response_logprobs,
)

pytestmark = pytest.mark.integration

QUESTIONS = ["What colour is the circle?", "How many objects are there?", "Which shape is red?"]
RESPONSES = ["red", "I don't know.", "the small blue triangle on the left of the big green square"]


def _to_left_padding(batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Move each right-padded row's tokens to the right end (as generation batches are padded)."""
    out = {k: v.clone() for k, v in batch.items()}
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        width = batch["input_ids"].shape[1]
        for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("response_mask", False)):
            out[key][row] = fill
            out[key][row, width - n :] = batch[key][row, :n]
    return out


@pytest.fixture(scope="module")
def model_and_batches(tiny_checkpoint: Path):
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    size = processor.image_processor.crop_size["height"]
    pixels = torch.randn(len(QUESTIONS), 3, size, size)
    right = encode_prompt_response(processor, pixels, QUESTIONS, RESPONSES)
    left = _to_left_padding(right, processor.tokenizer.pad_token_id)
    return model, {"right": right, "left": left}


def _naive(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
    ).logits
    return naive_response_logprobs_from_logits(logits, batch["input_ids"], batch["response_mask"])


def _ours(model, batch: dict[str, torch.Tensor], chunk_size: int = 4):
    return response_logprobs(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["response_mask"],
        chunk_size=chunk_size,
    )


@pytest.mark.parametrize("padding", ["right", "left"])
def test_equals_full_logits_gather(model_and_batches, padding: str) -> None:
    model, batches = model_and_batches
    batch = batches[padding]
    lengths = batch["response_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) > 1  # responses of different lengths in one batch
    with torch.no_grad():
        want = _naive(model, batch)
        got = _ours(model, batch)
    assert got.per_sequence.shape == (len(QUESTIONS),)
    assert got.per_token.shape == (int(lengths.sum()),)
    assert torch.allclose(got.per_sequence, want, atol=1e-5, rtol=1e-6)  # sums of ~100 nats in float32
    assert torch.equal(torch.bincount(got.sequence_ids, minlength=len(QUESTIONS)), lengths)


def test_per_token_values_match_their_positions(model_and_batches) -> None:
    model, batches = model_and_batches
    batch = batches["right"]
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
        got = _ours(model, batch).per_token
    rows, cols = batch["response_mask"].nonzero(as_tuple=True)
    want = logits[rows, cols - 1].log_softmax(-1).gather(1, batch["input_ids"][rows, cols, None]).squeeze(1)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_backbone_hidden_is_what_the_lm_head_sees(model_and_batches) -> None:
    model, batches = model_and_batches
    batch = batches["left"]
    with torch.no_grad():
        hidden = backbone_hidden(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
    assert torch.allclose(model.lm_head(hidden), logits, atol=1e-5, rtol=0)


def test_gradients_reach_every_parameter_like_the_naive_path(model_and_batches) -> None:
    """Same DPO-style weighted loss through both paths: same gradients on vision, projector, LM, lm_head."""
    model, batches = model_and_batches
    batch = batches["right"]
    weights = torch.tensor([1.0, -0.5, 2.0])
    params = dict(model.named_parameters())
    grads = {}
    for name, fn in (
        ("naive", lambda: _naive(model, batch)),
        ("ours", lambda: _ours(model, batch).per_sequence),
    ):
        model.zero_grad(set_to_none=True)
        (fn() * weights).sum().backward()
        grads[name] = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert grads["ours"].keys() == grads["naive"].keys()
    assert any("vision_tower" in k for k in grads["ours"]) and any(
        "multi_modal_projector" in k for k in grads["ours"]
    )
    for key, want in grads["naive"].items():
        assert torch.allclose(grads["ours"][key], want, atol=1e-5, rtol=1e-4), key


def test_lora_adapters_receive_gradients_and_can_be_disabled(model_and_batches) -> None:
    """With peft LoRA on the language model, adapters learn through the hidden states; disabling them gives
    the base model's numbers (the frozen reference of CA-DPO)."""
    import peft

    model, batches = model_and_batches
    batch = batches["right"]
    with torch.no_grad():
        base = _ours(model, batch).per_sequence
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False
    )
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    lora = peft.get_peft_model(model, config)
    try:
        got = _ours(lora, batch).per_sequence
        want = _naive(lora, batch)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-6)
        assert not torch.allclose(got, base, atol=1e-4)  # the adapters change the numbers
        got.sum().backward()
        lora_grads = {n: p.grad for n, p in lora.named_parameters() if "lora_" in n}
        assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads.values())
        with torch.no_grad(), lora.disable_adapter():
            assert torch.allclose(_ours(lora, batch).per_sequence, base, atol=1e-6, rtol=0)
    finally:
        lora.unload()  # restore the shared module-scoped model (peft also froze the base weights)
        for name, param in model.named_parameters():
            param.requires_grad_(trainable[name])
