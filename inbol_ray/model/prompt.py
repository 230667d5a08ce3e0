"""The one prompt renderer and LLaVA-1.5's conversation format, written once for every stage and engine.

`render_prompt` turns an item (question, options) into the user text under `cfg.prompt`'s instructions;
`format_prompt` wraps that text in the chat format. Base training, sampling, construction, training, the
reference pass, evaluation, Serve and the demo all go through these two, so one item is byte-identical
wherever it is shown to the model, and the rendered text is stored in each table's `prompt` column.

llava-hf checkpoints format a turn as `USER: <image>\n{question} ASSISTANT:`; the answer follows after
one space and ends with the EOS token. The chat template shipped with the tiny checkpoint renders the
same string (a test checks they agree), so a user's LLaVA-1.5-7B and our tiny model share one path.
"""

from __future__ import annotations

from collections.abc import Sequence

from inbol_ray.config.sections import PromptConfig

IMAGE_TOKEN = "<image>"

# Jinja chat template in LLaVA-1.5's conversation format (llava-hf style, with `{{-` trimming avoided:
# it ate the space after "USER:" in transformers 5, see DESIGN.md section 7).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""Option letters: choice i of an item is shown as `LETTERS[i]. <option>` and graded by that letter."""


def render_prompt(
    question: str,
    choices: Sequence[str] | None = None,
    prompt: PromptConfig | None = None,
    *,
    refusal: bool = False,
) -> str:
    """The user text of one item as every stage shows it to the model (the `prompt` column).

    LLaVA-1.5's conventions: an open question ends with the short-answer instruction; a multiple-choice
    question lists its options one per line as `A. <option>` and ends with the letter instruction (its
    MMBench/ScienceQA scripts). A hint or context is already the question's first line (the loaders put
    it there), so it reads as context before the question. `refusal`: the refusal-prompt baseline adds
    its clause after the instruction and changes nothing else.
    """
    cfg = prompt if prompt is not None else PromptConfig()
    choices = [] if choices is None else list(choices)  # Arrow lists, numpy arrays (pandas) or None
    lines = [question.strip()]
    if choices:
        if len(choices) > len(LETTERS):
            raise ValueError(f"{len(choices)} options: at most {len(LETTERS)} can be lettered")
        lines += [f"{LETTERS[i]}. {str(option).strip()}" for i, option in enumerate(choices)]
    instruction = cfg.multiple_choice if choices else cfg.short_answer
    tail = " ".join(part for part in (instruction, cfg.refusal_clause if refusal else "") if part)
    if tail:
        lines.append(tail)
    return "\n".join(lines)


def format_prompt(prompt: str, image: bool = True, system: str = "") -> str:
    """The generation prompt (chat template applied) for a rendered user text, after its image unless
    `image` is False (a text-only item: the template then shows the text alone). `system` (`prompt.system`)
    opens the conversation as LLaVA's vicuna_v1 does: `<system> USER: <image>\n<question> ASSISTANT:`
    (llava/conversation.py, SeparatorStyle.TWO: system + " " + "USER: " + message + " " + "ASSISTANT:")."""
    turn = f"USER: {IMAGE_TOKEN}\n{prompt} ASSISTANT:" if image else f"USER: {prompt} ASSISTANT:"
    return f"{system} {turn}" if system else turn


def format_response(answer: str) -> str:
    """The assistant's text as it follows the prompt (leading space; EOS is appended by the encoder)."""
    return " " + answer.strip()


def chat_user_message(text: str, image: bytes | None = None) -> dict:
    """One user turn in the OpenAI chat format: the image (if any) as a `data:` URL, then the text. What an
    OpenAI-compatible endpoint is sent, ours or another's; its chat template turns it into `format_prompt`."""
    import base64

    content: list[dict] = []
    if image is not None:
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        content.append({"type": "image_url", "image_url": {"url": url}})
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}
