"""Gradient checkpointing changes memory, not numbers; half-precision full fine-tuning keeps float32 weights.

On the tiny checkpoint, CPU: the policy is built exactly as the training loop builds it (`load_policy`,
then `enable_gradient_checkpointing`), and the loss is the shared-prefix forward the loop differentiates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoProcessor

from inbol_ray.config import ConfigError, TrainConfig, load_config
from inbol_ray.model.batching import encode_prompts
from inbol_ray.train.data import _response_ids
from inbol_ray.train.lora import enable_gradient_checkpointing, export_model, load_policy
from inbol_ray.train.response_logprobs import causal_lm
from inbol_ray.train.shared_prefix import pack_responses, per_response, shared_prefix_token_logprobs

QUESTIONS = ["What colour is the circle?", "How many objects are there?"]
RESPONSES = [["red", "blue", "I don't know."], ["three", None, "I don't know."]]
WEIGHTS = torch.tensor([[1.0, -0.7, 0.3], [2.0, 0.0, -1.0]])


@pytest.fixture(scope="module")
def processor(tiny_checkpoint: Path):
    return AutoProcessor.from_pretrained(tiny_checkpoint)


def _batch(processor):
    size = processor.image_processor.crop_size["height"]
    pixels = torch.randn(len(QUESTIONS), 3, size, size, generator=torch.Generator().manual_seed(1))
    responses = [_response_ids(processor.tokenizer, r) for r in RESPONSES]
    return pack_responses(
        encode_prompts(processor, QUESTIONS), responses, processor.tokenizer.pad_token_id, pixels
    )


def _policy(tiny_checkpoint: Path, cfg: TrainConfig):
    torch.manual_seed(0)
    policy = load_policy(str(tiny_checkpoint), "float32", cfg)
    # LoRA's B starts at zero (no gradient reaches A) and the untrained model is near uniform: perturb
    # what trains so every trainable tensor gets a non-trivial gradient.
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return policy.train()


def _loss_and_grads(policy, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    policy.zero_grad(set_to_none=True)
    loss = torch.nansum(
        per_response(shared_prefix_token_logprobs(policy, batch, chunk_size=64), batch) * WEIGHTS
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_gradient_checkpointing_keeps_loss_and_gradients(
    tiny_checkpoint: Path, processor, lora: bool
) -> None:
    cfg = TrainConfig(lora=lora, lora_r=4, lora_alpha=8, gradient_checkpointing=True)
    policy = _policy(tiny_checkpoint, cfg)
    batch = _batch(processor)
    loss, grads = _loss_and_grads(policy, batch)

    enable_gradient_checkpointing(policy)
    layer = causal_lm(policy).model.language_model.layers[0]
    calls = []
    hook = layer.register_forward_pre_hook(lambda *_: calls.append(1))  # recompute stops early
    loss_ckpt, grads_ckpt = _loss_and_grads(policy, batch)
    hook.remove()

    assert len(calls) == 2, "the layer should run again in the backward (recomputed, not stored)"
    assert causal_lm(policy).config.get_text_config().use_cache is False
    assert torch.allclose(loss_ckpt, loss, rtol=1e-6, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys() and grads
    assert any("lora_A" in n for n in grads) == lora
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        assert torch.allclose(grads_ckpt[name], g, rtol=1e-5, atol=1e-7), name


def test_half_precision_full_fine_tuning_trains_float32_weights(tiny_checkpoint: Path) -> None:
    cfg = TrainConfig(lora=False)
    policy = load_policy(str(tiny_checkpoint), "bfloat16", cfg)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    lora = load_policy(str(tiny_checkpoint), "bfloat16", TrainConfig(lora=True, lora_r=4))
    dtypes = {n: p.dtype for n, p in lora.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)  # peft upcasts adapters
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)  # the base stays half


def test_export_is_cast_back_to_the_model_dtype(tiny_checkpoint: Path, processor, tmp_path: Path) -> None:
    policy = load_policy(str(tiny_checkpoint), "bfloat16", TrainConfig(lora=False))
    export_model(policy, processor, str(tmp_path), merge=True, dtype="bfloat16")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert dtypes == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def test_half_precision_full_fine_tuning_without_master_weights_is_refused() -> None:
    bad = ["model.dtype=bfloat16", "train.lora=false", "train.fp32_master_weights=false"]
    with pytest.raises(ConfigError, match="fp32_master_weights") as err:
        load_config(None, bad)
    assert "\n" not in str(err.value)
    load_config(None, bad[:2])  # the default keeps float32 master weights: fine
    load_config(None, ["model.dtype=bfloat16", "train.fp32_master_weights=false"])  # LoRA: no effect
