"""The transformers engine's K-sample path prefills each prompt once; it must decode what `generate` does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from inbol_ray.checkpoint import load_model
from inbol_ray.config import ShapesConfig
from inbol_ray.data import shapes
from inbol_ray.model.generation import encode_batch, sample_shared_prefill, top_p_filter

SMALL = ShapesConfig(n_pretrain=4, n_train=4, n_id_test=4, n_ood_test=4, n_unanswerable_test=4)
# different lengths, so left padding and its positions are exercised
QUESTIONS = ["What colour is the circle?", "How many?", "Is there a red square left of the blue triangle?"]


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_filter_matches_transformers(top_p: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen) * 3
    logits[0, :10] = 1.0  # ties
    expected = TopPLogitsWarper(top_p)(torch.zeros(6, 1, dtype=torch.long), logits.clone())
    assert torch.equal(top_p_filter(logits, top_p), expected)
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def _inputs(ckpt: Path, size: int):
    model, processor = load_model(str(ckpt))
    images = [it.image for it, _ in zip(shapes.generate(SMALL, size), range(3), strict=False)]
    return model, processor, *encode_batch(processor, images, QUESTIONS)


@torch.inference_mode()
def test_greedy_shared_prefill_equals_generate(tiny_checkpoint: Path, tiny_config) -> None:
    model, processor, ids, mask, pv = _inputs(tiny_checkpoint, tiny_config.model.image_size)
    tok = processor.tokenizer
    assert len(set(mask.sum(-1).tolist())) == 3
    new = 8
    ref = model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pv,
        do_sample=False,
        max_new_tokens=new,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )[:, ids.shape[1] :]
    k = 3
    ours = sample_shared_prefill(
        model, ids, mask, pv, k, 1.0, 1.0, new, tok.eos_token_id, tok.pad_token_id, greedy=True
    )
    assert ours.shape == (3 * k, ref.shape[1])
    assert torch.equal(ours, ref.repeat_interleave(k, dim=0))


@torch.inference_mode()
def test_sampled_rows_are_seeded_and_bounded(tiny_checkpoint: Path, tiny_config) -> None:
    model, processor, ids, mask, pv = _inputs(tiny_checkpoint, tiny_config.model.image_size)
    tok = processor.tokenizer
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(
            sample_shared_prefill(model, ids, mask, pv, 5, 1.0, 0.9, 6, tok.eos_token_id, tok.pad_token_id)
        )
    assert torch.equal(runs[0], runs[1]) and runs[0].shape[0] == 15 and runs[0].shape[1] <= 6
    # K samples of one prompt differ (an untrained model spreads its mass over the vocabulary)
    assert len({tuple(r) for r in runs[0][:5].tolist()}) > 1
    # nothing but padding after an EOS
    for row in runs[0].tolist():
        if tok.eos_token_id in row:
            assert set(row[row.index(tok.eos_token_id) + 1 :]) <= {tok.pad_token_id}


LONG = "Is there a red square left of the blue triangle and above the green circle near the yellow star?"


def test_samples_and_greedy_answers_do_not_depend_on_the_batch(tiny_checkpoint: Path, tiny_config) -> None:
    """An item's K samples (and its greedy answer) are the same alone, in a mixed batch of several prompt
    lengths (two padded widths, more rows than one forward takes) and in any order (DESIGN.md 1.6)."""
    from inbol_ray.model.generation import GREEDY_ROWS_PER_FORWARD, ROWS_PER_FORWARD, generate_responses
    from inbol_ray.sampling.base import item_seeds

    model, processor = load_model(str(tiny_checkpoint))
    n = max(ROWS_PER_FORWARD, GREEDY_ROWS_PER_FORWARD) + 3  # more rows than one forward takes, either way
    scenes = [it.image for it in shapes.generate(SMALL, tiny_config.model.image_size)]
    images = [scenes[i % len(scenes)] for i in range(n)]
    questions = [(QUESTIONS + [LONG])[i % 4] for i in range(n)]
    ids = [f"item-{i}" for i in range(n)]
    seeds = item_seeds(0, ids)

    def run(order: list[int], **kw) -> dict[str, list[str]]:
        out = generate_responses(
            model, processor, [images[i] for i in order], [questions[i] for i in order],
            max_new_tokens=5, seeds=[seeds[i] for i in order], **kw,
        )  # fmt: skip
        return {ids[i]: r for i, r in zip(order, out, strict=True)}

    sample = {"k": 4, "do_sample": True, "temperature": 1.0, "top_p": 0.9}
    alone = {ids[i]: run([i], **sample)[ids[i]] for i in (0, 3, n - 1)}
    together = run(list(range(n)), **sample)
    shuffled = run(list(reversed(range(n))), **sample)
    assert together == shuffled
    assert all(together[i] == r for i, r in alone.items())
    assert len({tuple(r) for r in together.values()}) > 1  # items do not share a stream
    greedy_alone = {ids[i]: run([i])[ids[i]] for i in (0, 3, n - 1)}
    greedy = run(list(range(n)))
    assert all(greedy[i] == r for i, r in greedy_alone.items())
    other_seeds = item_seeds(1, ids)
    moved = generate_responses(
        model, processor, images[:1], questions[:1], max_new_tokens=5, seeds=other_seeds[:1], **sample
    )
    assert moved[0] != alone[ids[0]]  # the run's seed matters
