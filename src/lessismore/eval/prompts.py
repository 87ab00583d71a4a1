"""Prompts: the paper's instruction appended to the problem, wrapped in the model's chat template.

The authors' script wrote "\\boxed" inside a plain Python string, where "\\b" is a backspace; here the
backslash is a real backslash (raw strings), and a test checks it.
"""
from __future__ import annotations

import warnings

MATH_INSTRUCTION = r"Please reason step by step, and put your final answer within \boxed{}."
# The wording of the common GPQA-Diamond file (LIMO / LessIsMore), kept so scores stay comparable.
GPQA_INSTRUCTION = r"Please reason step-by-step and put your choice letter without any other text with \boxed{} in the end."


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer, user_message: str) -> str:
    """The text the model sees: one user turn in the chat template, ready for the assistant's reply.

    A tokenizer without a chat template (a base model) gets the bare message, with a warning."""
    if not has_chat_template(tokenizer):
        warnings.warn("the tokenizer has no chat template; sending the bare prompt", stacklevel=2)
        return user_message
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
    )
