"""Other architectures' own chat formats (`model.chat_format`) and the engine choice for them."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoProcessor

from inbol_ray.config import SamplingConfig
from inbol_ray.generation import actor
from inbol_ray.model.chat_format import chat_text, model_type, uses_own_template


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


def test_vllm_falls_back_to_transformers_only_for_other_architectures(
    tiny_qwen2_vl: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """An architecture vLLM does not implement is still scored (by transformers, said in the log); a
    failing vLLM on the project's own LLaVA checkpoints is an error, never silently another engine."""
    real = actor.build_sampler

    def no_such_vllm_model(engine, model_dir, cfg, dtype):
        if engine == "vllm":
            raise ValueError("Model architectures ['X'] are not supported for now")
        return real(engine, model_dir, cfg, dtype)

    monkeypatch.setattr(actor, "build_sampler", no_such_vllm_model)
    sampler = actor.load_sampler(SamplingConfig(engine="vllm"), str(tiny_qwen2_vl), "float32")
    assert sampler.engine == "transformers" and "using transformers" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not supported"):
        actor.load_sampler(SamplingConfig(engine="vllm"), str(tiny_checkpoint), "float32")
