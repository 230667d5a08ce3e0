"""The tiny LLaVA checkpoint is a real HF directory, loaded only through the calls a 7B user makes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoProcessor, LlavaForConditionalGeneration

from inbol_ray.checkpoint import load_model
from inbol_ray.config import ModelConfig, ShapesConfig
from inbol_ray.data import shapes
from inbol_ray.model.batching import encode_prompt_response
from inbol_ray.model.generation import generate_responses
from inbol_ray.model.prompt import format_prompt
from inbol_ray.model.tiny import build_tiny_checkpoint
from inbol_ray.refusal import REFUSAL_TEMPLATES

SMALL = ShapesConfig(n_pretrain=4, n_train=4, n_id_test=4, n_ood_test=4, n_unanswerable_test=4)


def _images(n: int, size: int) -> list[bytes]:
    return [it.image for it, _ in zip(shapes.generate(SMALL, size), range(n), strict=False)]


def test_layout_is_llava_hf(tiny_checkpoint: Path) -> None:
    files = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= files
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["text_config"]["model_type"] == "llama"
    assert config["text_config"]["hidden_size"] // config["text_config"]["num_attention_heads"] == 64
    with safe_open(str(tiny_checkpoint / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    vision = [k for k in keys if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    assert any(k.startswith("multi_modal_projector.") for k in keys)


def test_round_trip_and_image_token_id(tiny_checkpoint: Path) -> None:
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert processor.image_token_id == model.config.image_token_index
    params = dict(model.named_parameters())
    with safe_open(str(tiny_checkpoint / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("vision_tower.vision_model.embeddings.patch_embedding.weight")
        assert torch.equal(stored, params["model.vision_tower.embeddings.patch_embedding.weight"])
        stored = f.get_tensor("multi_modal_projector.linear_1.weight")
        assert torch.equal(stored, params["model.multi_modal_projector.linear_1.weight"])


def test_builder_is_deterministic(tmp_path: Path) -> None:
    cfg = ModelConfig()
    a = build_tiny_checkpoint(tmp_path / "a", cfg, SMALL)
    b = build_tiny_checkpoint(tmp_path / "b", cfg, SMALL)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    with (
        safe_open(str(a / "model.safetensors"), "pt") as fa,
        safe_open(str(b / "model.safetensors"), "pt") as fb,
    ):
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())  # noqa: SIM118 (safe_open is not iterable in every safetensors)


def test_chat_template_matches_prompt_format(tiny_checkpoint: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}],
        }
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert (
        rendered
        == format_prompt("What colour is the circle?")
        == "USER: <image>\nWhat colour is the circle? ASSISTANT:"
    )
    text_only = [{"role": "user", "content": [{"type": "text", "text": "What is two plus two?"}]}]
    rendered = processor.apply_chat_template(text_only, add_generation_prompt=True)
    assert (
        rendered
        == format_prompt("What is two plus two?", image=False)
        == "USER: What is two plus two? ASSISTANT:"
    )


def test_tokenizer_keeps_benchmark_words_whole(tiny_checkpoint: Path) -> None:
    tok = AutoProcessor.from_pretrained(tiny_checkpoint).tokenizer
    for word in ["red", "circle", "triangle", "three", "yes"]:
        assert len(tok.tokenize(" " + word)) == 1, word
    text = REFUSAL_TEMPLATES[0]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.unk_token_id not in tok("Ünïcode ✓ prompt", add_special_tokens=False)["input_ids"]


def test_processor_expands_image_tokens_like_the_encoder(tiny_checkpoint: Path, tiny_config) -> None:
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(_images(1, tiny_config.model.image_size)[0]))
    via_processor = processor(
        images=[img], text=[format_prompt("How many objects are there?")], return_tensors="pt"
    )
    ours = encode_prompt_response(processor, [img], ["How many objects are there?"], ["three"])
    n_prompt = int((~ours["response_mask"][0]).sum())
    assert via_processor["input_ids"][0].tolist() == ours["input_ids"][0, :n_prompt].tolist()
    assert torch.allclose(via_processor["pixel_values"], ours["pixel_values"])
    n_image = (tiny_config.model.image_size // tiny_config.model.patch_size) ** 2
    assert int((ours["input_ids"][0] == processor.image_token_id).sum()) == n_image


def test_generation_with_an_image(tiny_checkpoint: Path, tiny_config) -> None:
    model, processor = load_model(str(tiny_checkpoint))
    images = _images(3, tiny_config.model.image_size)
    greedy = generate_responses(
        model, processor, images, ["What colour is the circle?"] * 3, max_new_tokens=4
    )
    assert len(greedy) == 3 and all(len(r) == 1 and isinstance(r[0], str) for r in greedy)
    sampled = generate_responses(
        model,
        processor,
        images,
        ["How many objects are there?"] * 3,
        k=4,
        do_sample=True,
        max_new_tokens=4,
        seed=1,
    )
    assert [len(r) for r in sampled] == [4, 4, 4]
    again = generate_responses(
        model,
        processor,
        images,
        ["How many objects are there?"] * 3,
        k=4,
        do_sample=True,
        max_new_tokens=4,
        seed=1,
    )
    assert sampled == again


def test_training_labels_cover_response_and_eos_only(tiny_checkpoint: Path, tiny_config) -> None:
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    images = _images(2, tiny_config.model.image_size)
    batch = encode_prompt_response(
        processor, images, ["Which shape is red?", "How many objects are there?"], ["circle", "I don't know."]
    )
    tok = processor.tokenizer
    for row in range(2):
        labels = batch["labels"][row]
        kept = labels[labels != -100].tolist()
        assert kept[-1] == tok.eos_token_id
        assert tok.decode(kept[:-1]).strip() == ["circle", "I don't know."][row]
        assert batch["attention_mask"][row].sum() == (batch["input_ids"][row] != tok.pad_token_id).sum()


def test_base_training_does_not_depend_on_the_row_order_of_items(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Prepare's files come back in a run-dependent row order; the base model must not."""
    import dataclasses

    import numpy as np

    from inbol_ray.config import BaseTrainConfig
    from inbol_ray.model.base_train import train_base

    small = dataclasses.replace(ShapesConfig(), n_pretrain=48, n_train=0, n_id_test=0, n_ood_test=0)
    small = dataclasses.replace(small, n_unanswerable_test=0)
    items = shapes.generate_items(small, ModelConfig().image_size)
    shuffled = items.take(np.random.default_rng(1).permutation(items.num_rows))
    cfg = BaseTrainConfig(steps=3, batch_size=8, warmup_steps=1)
    a = train_base(str(tiny_checkpoint), items, str(tmp_path / "a"), cfg, log=lambda _: None)
    b = train_base(str(tiny_checkpoint), shuffled, str(tmp_path / "b"), cfg, log=lambda _: None)
    wa, wb = load_model(a)[0].state_dict(), load_model(b)[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
