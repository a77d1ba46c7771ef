"""Prompt templates: the student's prompt and the teacher's privileged prompt.

The teacher sees the problem, the reference solution and a coarse diagnosis of the attempt —
never the annotated span text. Both prompts are followed by the *same* response tokens.
"""

from __future__ import annotations

DIAGNOSIS = {True: "This attempt is correct.", False: "This attempt contains an error."}


def plain_prompt(question: str) -> str:
    return f"Q: {question}\nA:"


def plain_privileged_prompt(question: str, reference: str, correct: bool | None) -> str:
    note = "" if correct is None else f"\nNote: {DIAGNOSIS[correct]}"
    return f"Q: {question}\nReference: {reference}{note}\nA:"


def chat_prompt(question: str, system: str | None = None) -> str:
    """Qwen chat format (the format Qwen3 instruct checkpoints expect); thinking left on."""
    sys = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{sys}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def chat_privileged_prompt(
    question: str, reference: str, correct: bool | None, system: str | None = None
) -> str:
    note = "" if correct is None else f"\n\n{DIAGNOSIS[correct]}"
    user = (
        f"{question}\n\nA reference solution, for you only:\n{reference}{note}\n\n"
        "Solve the problem."
    )
    return chat_prompt(user, system)


TEMPLATES = {
    "plain": (plain_prompt, plain_privileged_prompt),
    "qwen_chat": (chat_prompt, chat_privileged_prompt),
}


def get(name: str):
    """(student_prompt_fn, privileged_prompt_fn) of a template."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]
