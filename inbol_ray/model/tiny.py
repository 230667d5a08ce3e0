"""Build the tiny LLaVA checkpoint: a real Hugging Face directory, made without any hub access.

Why: weights cannot be downloaded here, yet every stage must run the same calls a user runs on
`llava-hf/llava-1.5-7b-hf` (`LlavaForConditionalGeneration.from_pretrained`, `AutoProcessor`, vLLM's
LLaVA loader). So the directory has the same layout: config.json with a CLIP vision tower, projector and
Llama LM; model.safetensors with llava-hf key names; a fast tokenizer trained on ShapesWorld's text and
the refusal templates; a CLIP image processor; LLaVA-1.5's chat template.

    python -m inbol_ray.model.tiny --out DIR [--config configs/tiny.yaml]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from inbol_ray.checkpoint import to_llava_hf_layout
from inbol_ray.config import ConfigError, ModelConfig, PromptConfig, ShapesConfig, load_config
from inbol_ray.data import shapes
from inbol_ray.model.prompt import CHAT_TEMPLATE, IMAGE_TOKEN, format_prompt, format_response, render_prompt
from inbol_ray.refusal import REFUSAL_TEMPLATES

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
HEAD_DIM = 64  # vLLM's attention backends accept head sizes 32..256; 64 is the common one
# CLIP's mean/std as llava-hf uses them: the tiny model is trained from scratch, but keeping the same
# normalisation means the image path is exactly the one a real checkpoint takes.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tokenizer_corpus(shapes_cfg: ShapesConfig, prompt: PromptConfig) -> list[str]:
    """ShapesWorld text, prompts as the model sees them (rendered with `prompt`'s instructions, so each
    instruction merges into a few tokens), and refusals, so no answer splits oddly."""
    from inbol_ray.data.export.questions import HINTS, REFUSAL_OPTION

    lines = shapes.corpus(shapes_cfg) + list(REFUSAL_TEMPLATES)
    instructions = [prompt.short_answer, prompt.multiple_choice, prompt.refusal_clause, prompt.system]
    # Short lines are the answers: repeat them as responses so BPE merges each into one token, which
    # keeps answers to one or two generated tokens.
    words = [line for line in lines if len(line.split()) == 1]
    answers = [format_response(line) for line in words] * 20
    rendered = [
        format_prompt(render_prompt(line, None, prompt), system=prompt.system) + format_response(line)
        for line in lines
    ]
    # Multiple choice as the real formats show it: hints first, lettered options, letter answers.
    context = [f"{style}{hint}" for hint in HINTS.values() for style in shapes.HINT_STYLES]
    options = [render_prompt(q, words[i : i + 4] + [REFUSAL_OPTION], prompt) for i, q in enumerate(context)]
    letters = [format_response(letter) for letter in "ABCDE"] * 20
    return rendered + lines + [i for i in instructions if i] + context + options + answers + letters


def prompt_phrases(prompt: PromptConfig) -> list[str]:
    """Whole sentences every prompt repeats (the instructions, the system line, the multiple-choice hints):
    one token each.

    Why: byte-level BPE never merges across spaces, so LLaVA-1.5's 11-word instruction would cost 11 of
    the ~25 positions of a tiny prompt (and the hints more) in every forward pass of every stage: 2x the
    compute of the embedded default for text the model reads identically each time. A large tokenizer
    spends tokens on them too, but next to 576 image tokens. The prompt text itself is unchanged.
    """
    from inbol_ray.data.export.questions import HINTS

    sentences = (prompt.short_answer, prompt.multiple_choice, prompt.refusal_clause, prompt.system)
    return [p for p in sentences if p] + list(HINTS.values())


def train_tokenizer(lines: list[str], vocab_size: int, phrases: list[str] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte is representable, so no prompt a user types can produce <unk>.

    `phrases` become single tokens on top of the BPE vocabulary (`prompt_phrases`)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in phrases])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=2048,
        padding_side="left",
        add_bos_token=True,
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def _with_bos(fast: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Prepend <s> like Llama's tokenizer, via a post-processor so vLLM and HF agree."""
    from tokenizers import processors

    bos = fast.bos_token
    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, fast.bos_token_id)]
    )
    return fast


def model_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 4,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_hidden // HEAD_DIM,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * 3,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_hidden // HEAD_DIM,
        num_key_value_heads=cfg.text_hidden // HEAD_DIM,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        # LLaVA-1.5 reads layer -2; with a 2-layer tiny tower that would leave the last layer unused
        # (and DDP then complains), so the tiny model reads the last layer. The code reads this field.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(cfg.image_size // cfg.patch_size) ** 2,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_processor(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_checkpoint(
    out_dir: str | Path,
    cfg: ModelConfig,
    shapes_cfg: ShapesConfig | None = None,
    prompt: PromptConfig | None = None,
) -> Path:
    """Write the checkpoint to `out_dir` (deterministic in `cfg.seed`) and return the path."""
    out = Path(out_dir)
    shapes_cfg = shapes_cfg or ShapesConfig()
    prompt = prompt or PromptConfig()
    corpus = tokenizer_corpus(shapes_cfg, prompt)
    tokenizer = _with_bos(train_tokenizer(corpus, cfg.vocab_size, prompt_phrases(prompt)))
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(model_config(cfg, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    to_llava_hf_layout(str(out))
    build_processor(cfg, tokenizer).save_pretrained(out)
    (out / "inbol_tiny.json").write_text(json.dumps({"model": cfg.__dict__, "shapes_seed": shapes_cfg.seed}))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--config", default=None, help="YAML config (model and data.shapes sections)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None
    path = build_tiny_checkpoint(args.out, cfg.model, cfg.data.shapes, cfg.prompt)
    n = sum(p.numel() for p in LlavaForConditionalGeneration.from_pretrained(path).parameters())
    print(f"tiny LLaVA checkpoint written to {path} ({n / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    main()
