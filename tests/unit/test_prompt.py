"""The one prompt renderer: LLaVA-1.5's instructions, options as letters, the refusal clause only."""

from __future__ import annotations

import pytest

from inbol_ray.config import ConfigError, PromptConfig, load_config
from inbol_ray.config.loading import ConfigKeyError
from inbol_ray.grading import grade, is_refusal_response
from inbol_ray.model.prompt import format_prompt, render_prompt

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def test_open_question_ends_with_the_short_answer_instruction() -> None:
    assert render_prompt("  What colour is the circle? ") == f"What colour is the circle?\n{SHORT}"
    assert format_prompt(render_prompt("How many?")) == f"USER: <image>\nHow many?\n{SHORT} ASSISTANT:"


def test_multiple_choice_lists_lettered_options_then_the_letter_instruction() -> None:
    text = render_prompt("Context: a hint.\nWhich shape is red?", ["circle", " square ", "triangle"])
    assert text == ("Context: a hint.\nWhich shape is red?\nA. circle\nB. square\nC. triangle\n" + LETTER)


def test_refusal_prompt_adds_only_its_clause() -> None:
    cfg = PromptConfig()
    for choices in (None, ["yes", "no"]):
        plain = render_prompt("Is it red?", choices, cfg)
        refusing = render_prompt("Is it red?", choices, cfg, refusal=True)
        assert refusing == f"{plain} {cfg.refusal_clause}"


def test_instructions_come_from_the_config_and_may_be_empty() -> None:
    bare = PromptConfig(short_answer="", multiple_choice="Pick one.")
    assert render_prompt("What is it?", None, bare) == "What is it?"
    assert render_prompt("What is it?", None, bare, refusal=True) == f"What is it?\n{bare.refusal_clause}"
    assert render_prompt("What is it?", ["a", "b"], bare).endswith("B. b\nPick one.")


def test_bad_instructions_and_moved_keys_fail_with_one_line() -> None:
    with pytest.raises(ConfigError, match="prompt.short_answer"):
        PromptConfig(short_answer="two\nlines")
    with pytest.raises(ConfigError, match="refusal_clause is empty"):
        PromptConfig(refusal_clause="")
    with pytest.raises(ConfigKeyError, match="eval.answer_instruction' moved to prompt.short_answer"):
        load_config(None, ["eval.answer_instruction=Answer briefly."])


def test_mc_targets_and_grading_use_letters() -> None:
    """The model is shown letters, so a letter is graded (and a refusal option counts as a refusal where the set offers one)."""
    choices = ["circle", "square", "Sorry, I can't help with it"]
    assert "C. Sorry, I can't help with it" in render_prompt("Which shape?", choices)
    assert grade("B", ["B"], "mc_letter", choices)
    assert not grade("A", ["B"], "mc_letter", choices)
    assert is_refusal_response("C", choices, refusal_option=True)
    assert not is_refusal_response("B", choices, refusal_option=True)
