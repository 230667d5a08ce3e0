"""A tiny Qwen2-VL checkpoint: a second, non-LLaVA architecture for the cross-model evaluation path.

    python -m inbol_ray.model.tiny_qwen2_vl --out runs/tiny-qwen2-vl

Why it exists: the evaluation backends claim to score *any* local image-text-to-text checkpoint with its
own processor and chat template (`inbol_ray.model.chat_format`), and nothing can be downloaded here. So
tests build one of another family, as a real Hugging Face directory `Qwen2VLForConditionalGeneration` and
`AutoProcessor` load exactly as they load `Qwen/Qwen2-VL-2B-Instruct`: config with M-RoPE, the dynamic-
resolution vision tower with 2x2 patch merging, a Qwen2-VL image processor, a tokenizer with Qwen's special
tokens (`<|im_start|>`, `<|vision_start|><|image_pad|><|vision_end|>`, ...) and Qwen2-VL-Instruct's chat
template. Its weights are random (it is not trained here): it checks the path, not a result. The BPE is
trained on the same text as the tiny LLaVA's (`model.tiny.tokenizer_corpus`), so its answers are words.
"""

from __future__ import annotations

import argparse
import json
import os

from inbol_ray.config import PromptConfig, ShapesConfig

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]  # fmt: skip

# Qwen2-VL-Instruct's template, less video and vision ids (the parts an image question uses are verbatim).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MAX_PIXELS = 56 * 56
"""Images are resized to at most 56x56 (16 patches of 14 px, merged 2x2 into 4 image tokens): tiny, as
the model is; a real Qwen2-VL's processor allows up to 28*28*1280 pixels."""


def build_tiny_qwen2_vl(out_dir: str, seed: int = 0, vocab_size: int = 512) -> str:
    """Write the checkpoint (deterministic in `seed`) to `out_dir`; returns it."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from inbol_ray.model.tiny import CLIP_MEAN, CLIP_STD, prompt_phrases, tokenizer_corpus, train_tokenizer

    prompt = PromptConfig()
    base = train_tokenizer(tokenizer_corpus(ShapesConfig(), prompt), vocab_size, prompt_phrases(prompt))
    base.backend_tokenizer.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        model_max_length=2048,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    head_dim = 32  # vLLM's CPU attention kernels take head sizes of 32 and up
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 128, "num_heads": 4, "mlp_ratio": 2},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    assert 2 * sum(config.text_config.rope_parameters["mrope_section"]) == head_dim
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    images = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=MAX_PIXELS, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    videos = Qwen2VLVideoProcessor(min_pixels=28 * 28, max_pixels=MAX_PIXELS)  # the processor requires one
    Qwen2VLProcessor(
        image_processor=images, tokenizer=tokenizer, video_processor=videos, chat_template=CHAT_TEMPLATE
    ).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "inbol_tiny.json"), "w") as f:
        json.dump({"architecture": "qwen2_vl", "seed": seed, "trained": False}, f)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"tiny Qwen2-VL checkpoint written to {build_tiny_qwen2_vl(args.out, args.seed)}")


if __name__ == "__main__":
    main()
