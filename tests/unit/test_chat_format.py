"""Other architectures' own chat formats (`model.chat_format`) and the engine choice for them."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoProcessor

from inbol_ray.model.chat_format import (
    chat_text,
    checkpoint_config,
    choose_engine,
    model_type,
    uses_own_template,
)


def test_a_qwen2_vl_checkpoint_is_asked_in_its_own_format(tiny_qwen2_vl: Path, tiny_checkpoint: Path) -> None:
    assert model_type(str(tiny_qwen2_vl)) == "qwen2_vl" and uses_own_template("qwen2_vl")
    assert model_type(str(tiny_checkpoint)) == "llava" and not uses_own_template("llava")
    processor = AutoProcessor.from_pretrained(tiny_qwen2_vl)
    question = "Which shape is it?\nA. circle\nB. square\nAnswer with the option's letter from the given choices directly."
    assert chat_text(processor, question, has_image=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "<|vision_start|>" not in chat_text(processor, "What is two plus two?", has_image=False)


def test_vllm_hands_an_architecture_it_lacks_to_transformers(
    tiny_qwen2_vl: Path, tiny_checkpoint: Path
) -> None:
    """An architecture vLLM does not implement is still scored (by transformers); one it implements, and the
    project's own LLaVA checkpoints whatever vLLM says, keep the configured engine. vLLM is asked only when
    the answer depends on it."""
    qwen = checkpoint_config(str(tiny_qwen2_vl))
    archs = qwen["architectures"]
    assert archs == ["Qwen2VLForConditionalGeneration"]
    assert choose_engine("vllm", qwen, lambda: frozenset(archs)) == "vllm"
    assert choose_engine("vllm", qwen, lambda: frozenset({"LlavaForConditionalGeneration"})) == "transformers"

    def not_asked() -> frozenset[str]:
        raise AssertionError("vLLM asked where its answer changes nothing")

    assert choose_engine("vllm", checkpoint_config(str(tiny_checkpoint)), not_asked) == "vllm"
    assert choose_engine("transformers", qwen, not_asked) == "transformers"
