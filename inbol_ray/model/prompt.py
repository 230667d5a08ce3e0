"""LLaVA-1.5 conversation format, written once so the HF and vLLM engines see identical prompts.

llava-hf checkpoints format a turn as `USER: <image>\n{question} ASSISTANT:`; the answer follows after
one space and ends with the EOS token. The chat template shipped with the tiny checkpoint renders the
same string (a test checks they agree), so a user's LLaVA-1.5-7B and our tiny model share one path.
"""

from __future__ import annotations

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


def format_prompt(question: str, instruction: str | None = None) -> str:
    """The generation prompt for one image and one question (optionally with an instruction).

    The instruction goes after the question, as LLaVA-1.5's own "Answer the question using a single
    word or phrase." does, so the refusal-prompt baseline changes nothing else in the prompt.
    """
    text = question.strip()
    if instruction:
        text = f"{text}\n{instruction.strip()}"
    return f"USER: {IMAGE_TOKEN}\n{text} ASSISTANT:"


def format_response(answer: str) -> str:
    """The assistant's text as it follows the prompt (leading space; EOS is appended by the encoder)."""
    return " " + answer.strip()
