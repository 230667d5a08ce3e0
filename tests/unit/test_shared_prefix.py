"""The shared-prefix forward equals separate forwards per response: log-probs and gradients.

Separate forwards are the obvious correct code (one right-padded sequence per response, as the evaluation
and TRL's DPO build them, scored by `response_logprobs`); the packed forward must match it while running the
vision tower and the prompt once per item.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from inbol_ray.model.batching import encode_prompt_response, encode_prompts
from inbol_ray.train.data import _response_ids
from inbol_ray.train.response_logprobs import response_logprobs
from inbol_ray.train.shared_prefix import (
    PAD_SEGMENT,
    block_attention_mask,
    pack_responses,
    per_response,
    shared_prefix_token_logprobs,
)

QUESTIONS = ["What colour is the circle?", "How many objects are there?", "Is the square left of the star?"]
RESPONSES = [  # correct, incorrect, refusal; None = absent (known rows have no incorrect, unknown no correct)
    ["red", "blue", "I don't know."],
    ["three", None, "Sorry, I cannot answer this question based on the image."],
    [None, "the big green one", "I don't know."],
]


def test_packing_layout() -> None:
    batch = pack_responses([[5, 6, 7], [8, 9]], [[[1, 2], [3]], [None, [4, 4, 4]]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2, 3], [8, 9, 4, 4, 4, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 4, 0]]
    assert batch.segments.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 2, 2, 2, PAD_SEGMENT]]
    # first token of every response is predicted by the last prefix position
    assert batch.pred_cols.tolist() == [2, 3, 2, 1, 2, 3]
    assert batch.targets.tolist() == [1, 2, 3, 4, 4, 4]
    assert batch.slots.tolist() == [0, 0, 1, 3, 3, 3]
    assert batch.present.tolist() == [[True, True], [False, True]]
    assert batch.num_tokens == 11
    mask = block_attention_mask(batch.segments, "sdpa", torch.float32)[0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True]  # response 2 skips response 1
    assert mask[4].tolist() == [True, True, True, True, True, False]
    pad = block_attention_mask(batch.segments, "sdpa", torch.float32)[1, 0, 5]
    assert pad.tolist() == [False] * 5 + [True]  # padding sees only itself (no NaN rows)
    eager = block_attention_mask(batch.segments, "eager", torch.float32)
    assert torch.equal(eager == 0, block_attention_mask(batch.segments, "sdpa", torch.float32))


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model_processor(request, tiny_checkpoint: Path):
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float64, attn_implementation=request.param
    )
    # An untrained checkpoint has near-uniform outputs; perturb so the test is not trivially satisfied.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model, AutoProcessor.from_pretrained(tiny_checkpoint)


def _pixels(processor) -> torch.Tensor:
    size = processor.image_processor.crop_size["height"]
    g = torch.Generator().manual_seed(1)
    return torch.randn(len(QUESTIONS), 3, size, size, generator=g, dtype=torch.float64)


def _separate(model, processor, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3] one right-padded forward per (item, response), NaN where absent."""
    out = torch.full((len(QUESTIONS), 3), float("nan"), dtype=torch.float64)
    cols = []
    for k in range(3):
        rows = [b for b in range(len(QUESTIONS)) if RESPONSES[b][k] is not None]
        batch = encode_prompt_response(
            processor, pixels[rows], [QUESTIONS[b] for b in rows], [RESPONSES[b][k] for b in rows]
        )
        lp = response_logprobs(
            model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["response_mask"]
        ).per_sequence
        cols.append((rows, k, lp))
    for rows, k, lp in cols:
        out = out.index_put((torch.tensor(rows), torch.tensor([k] * len(rows))), lp)
    return out


def _shared(model, processor, pixels: torch.Tensor) -> torch.Tensor:
    prefixes = encode_prompts(processor, QUESTIONS)
    resp = [_response_ids(processor.tokenizer, r) for r in RESPONSES]
    batch = pack_responses(prefixes, resp, processor.tokenizer.pad_token_id, pixels)
    return per_response(shared_prefix_token_logprobs(model, batch, chunk_size=3), batch)


def test_shared_prefix_equals_separate_forwards(model_processor) -> None:
    model, processor = model_processor
    pixels = _pixels(processor)
    with torch.no_grad():
        want = _separate(model, processor, pixels)
        got = _shared(model, processor, pixels)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    present = ~torch.isnan(want)
    assert torch.allclose(got[present], want[present], atol=1e-6, rtol=1e-8)  # RMSNorm: float32 inside


def test_shared_prefix_gradients_equal_separate_forwards(model_processor) -> None:
    """A DPO-like weighted sum of the present log-probs: same gradient on every parameter."""
    model, processor = model_processor
    pixels = _pixels(processor)
    weights = torch.tensor([[1.0, -0.7, 0.3], [2.0, 0.0, -1.0], [0.0, -0.4, 0.9]], dtype=torch.float64)
    grads = {}
    for name, fn in (("separate", _separate), ("shared", _shared)):
        model.zero_grad(set_to_none=True)
        lp = fn(model, processor, pixels)
        torch.nansum(lp * weights).backward()
        grads[name] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert grads["shared"].keys() == grads["separate"].keys()
    assert any("vision_tower" in k for k in grads["shared"])
    assert any("multi_modal_projector" in k for k in grads["shared"])
    # Llama's RMSNorm computes in float32 even in a float64 model, so layouts that differ in the 16th digit
    # can round one float32 ulp apart: the agreement to expect is ~1e-7 relative, not float64's 1e-15.
    for key, g in grads["separate"].items():
        assert torch.allclose(grads["shared"][key], g, atol=1e-6, rtol=1e-5), key


def test_absent_responses_do_not_change_the_others(model_processor) -> None:
    model, processor = model_processor
    pixels = _pixels(processor)[:1]
    prefixes = encode_prompts(processor, QUESTIONS[:1])
    full = [_response_ids(processor.tokenizer, RESPONSES[0])]
    alone = [[None, full[0][1], None]]
    with torch.no_grad():
        a = per_response(
            shared_prefix_token_logprobs(model, pack_responses(prefixes, full, 0, pixels)),
            pack_responses(prefixes, full, 0, pixels),
        )
        packed = pack_responses(prefixes, alone, 0, pixels)
        b = per_response(shared_prefix_token_logprobs(model, packed), packed)
    assert torch.isnan(b[0, 0]) and torch.isnan(b[0, 2])
    assert torch.allclose(a[0, 1], b[0, 1], atol=1e-6, rtol=0)
