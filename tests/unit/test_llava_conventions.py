"""LLaVA-1.5's evaluation conventions in the LLaVA configs, quoted against their sources (issue 30).

The strings below are assembled the way LLaVA-1.5's own scripts assemble them, not by our renderer:
- llava/conversation.py, `conv_vicuna_v1` (SeparatorStyle.TWO): `system + " " + "USER: " + message + " " +
  "ASSISTANT:"`, the message being `"<image>\\n" + question` (LLaVA-1.5's evaluation uses --conv-mode vicuna_v1);
- llava/eval/model_vqa_mmbench.py: `question = hint + '\\n' + question` when the hint is not NaN, then
  `'\\n' + option_char + '. ' + option` per option, then `'\\n' + "Answer with the option's letter from the
  given choices directly."` (--single-pred-prompt);
- ScienceQA-IMG (llava_test_CQM-A.json as lmms-eval's `sqa_doc_to_text` reproduces it): `"Context: " + hint +
  "\\n"` when there is a hint, the question, `"\\n"` + the lettered options one per line, then the same
  instruction.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch

from inbol_ray import schema as S
from inbol_ray.config import load_config
from inbol_ray.data.loaders import load
from inbol_ray.model.batching import encode_prompt_response, encode_prompts
from inbol_ray.model.prompt import format_prompt, render_prompt
from inbol_ray.sampling.vllm_engine import engine_input
from inbol_ray.train.data import DPO_KINDS, encode_table
from tests.unit.loader_helpers import spec

ROOT = Path(__file__).resolve().parents[2]
VICUNA_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def _llava(size: str = "7b"):
    return load_config(ROOT / "configs" / f"llava-1.5-{size}.yaml")


def _vicuna_v1(message: str) -> str:
    return VICUNA_V1 + " " + "USER: " + "<image>\n" + message + " " + "ASSISTANT:"


def test_the_llava_configs_follow_llava_15() -> None:
    for size in ("7b", "13b"):
        cfg = _llava(size)
        assert cfg.prompt.system == VICUNA_V1
        assert cfg.model.image_aspect == "pad"
        assert cfg.train.weight_decay == 0.0  # scripts/v1_5/finetune_lora.sh: --weight_decay 0.
        assert {d.name: d.format for d in cfg.data.datasets}["aokvqa"] == "aokvqa_mc"
    assert load_config(ROOT / "configs" / "tiny.yaml").prompt.system == ""  # the tiny default has none


def test_mmbench_prompt_is_llava_15s() -> None:
    cfg = _llava()
    row = {r[S.ID]: r for r in load(spec("mmbench", "mmbench", "mmbench/MMBench_DEV_EN.tsv")).items}[
        "mmbench:0"
    ]
    question = "The square is in the middle." + "\n" + "What colour is the square?"
    for char, option in zip("ABCD", ["olive", "red", "blue", "white"], strict=True):
        question = question + "\n" + char + ". " + option
    expected = _vicuna_v1(question + "\n" + INSTRUCTION)
    rendered = render_prompt(row[S.QUESTION], row[S.CHOICES], cfg.prompt)
    assert format_prompt(rendered, system=cfg.prompt.system) == expected


def test_scienceqa_prompt_is_llava_15s() -> None:
    cfg = _llava()
    parsed = load(spec("scienceqa", "scienceqa", "scienceqa/problems.json", "scienceqa/images"))
    row = {r[S.ID]: r for r in parsed.items}["scienceqa:1"]
    choices = "\n".join(f"{c}. {o}" for c, o in zip("ABC", ["red", "green", "blue"], strict=True))
    text = (
        "Context: Look at the picture.\n"
        + "Which colour is the square?"
        + "\n"
        + choices
        + "\n"
        + INSTRUCTION
    )
    assert format_prompt(render_prompt(row[S.QUESTION], row[S.CHOICES], cfg.prompt), system=VICUNA_V1) == (
        _vicuna_v1(text)
    )


def test_the_system_line_reaches_every_encoder(tiny_checkpoint) -> None:
    """Sampling (transformers and vLLM), training and the reference pass all open with the system line."""
    from inbol_ray.checkpoint import load_processor

    processor = load_processor(str(tiny_checkpoint))
    tok = processor.tokenizer
    prompt = render_prompt("What colour is the circle?")
    with_system = format_prompt(prompt, system=VICUNA_V1)
    assert engine_input(None, prompt, "crop", (0, 0, 0), None, VICUNA_V1)["prompt"] == format_prompt(
        prompt, False, VICUNA_V1
    )
    ids = encode_prompts(processor, [prompt], system=VICUNA_V1)[0]
    assert tok.decode(ids, skip_special_tokens=False).startswith(tok.bos_token + VICUNA_V1 + " USER:")
    assert ids != encode_prompts(processor, [prompt])[0]
    row = {
        S.ID: "x", S.IMAGE: b"", S.IMAGE_PATH: None, S.PROMPT: prompt, S.RESP_CORRECT: "red",
        S.RESP_INCORRECT: "blue", S.RESP_REFUSAL: "I don't know.", S.CONF: 0.5, S.BUCKET: "mixed",
    }  # fmt: skip
    enc = encode_table(
        pa.Table.from_pylist([row], schema=S.CADPO_PAIRS), processor, DPO_KINDS, system=VICUNA_V1
    )
    assert enc.prefixes[0] == ids
    batch = encode_prompt_response(processor, torch.zeros(1, 3, 48, 48), [prompt], ["red"],
                                   system=VICUNA_V1)  # fmt: skip
    assert batch["input_ids"][0, : len(ids)].tolist() == ids
    assert with_system.startswith(VICUNA_V1 + " USER: <image>\n")


def test_the_served_chat_opens_with_the_system_line() -> None:
    from serve.chat_rules import with_system_line

    messages = [{"role": "user", "content": "What colour is the circle?"}]
    with_system_line(messages, VICUNA_V1)
    assert messages[0] == {"role": "system", "content": VICUNA_V1} and len(messages) == 2
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with_system_line(own, VICUNA_V1)  # a client's own system message is kept, not doubled
    assert [m["content"] for m in own] == ["Be brief.", "Hi"]
    plain = [{"role": "user", "content": "Hi"}]
    with_system_line(plain, "")
    assert plain == [{"role": "user", "content": "Hi"}]
