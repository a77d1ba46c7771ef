"""Final-answer extraction from model text, and a plain-number fast path.

Everything here is linear-time string work on the host (no sympy, no eval), so it is safe to run
on untrusted model output of any length in the training process itself.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# `\boxed{` / `\fbox{` openers; `\boxed 5` (no braces) is handled separately.
_BOX_OPEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_BARE_RE = re.compile(r"\\boxed +([^\s${}]+)")
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
# Last-number fallback: sign, thousands groups or digits, decimals, optional `/denominator`.
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# A whole string that is a plain number once `$`, `%`, thin spaces and a trailing `.` are removed.
_PLAIN_NUMBER_RE = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)")
_PLAIN_STRIP = ("\\$", "$", "\\%", "%", "\\!", "\\,", "{,}", "\\ ", "\\text{}")


def _matching_braces(text: str, start: int) -> dict[int, int]:
    """Maps each `{` at or after `start` to its matching `}`, in one O(len) pass.

    One pass for all openers keeps hostile inputs (thousands of unclosed `\\boxed{`) linear.
    """
    match: dict[int, int] = {}
    stack: list[int] = []
    for m in re.finditer(r"\\[{}]|[{}]", text[start:]):
        tok = m.group()
        if len(tok) == 2:  # escaped `\{` / `\}` are literal braces (sets), not groups
            continue
        pos = start + m.start()
        if tok == "{":
            stack.append(pos)
        elif stack:
            match[stack.pop()] = pos
    return match


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (nested braces allowed), else None."""
    opens = [m for m in _BOX_OPEN_RE.finditer(text)]
    if not opens:
        bare = list(_BOX_BARE_RE.finditer(text))
        return bare[-1].group(1).strip() if bare else None
    match = _matching_braces(text, opens[0].start())
    # A truncated last box (no closing brace) falls back to the previous complete one.
    for m in reversed(opens):
        brace = m.end() - 1
        if brace in match:
            return text[brace + 1 : match[brace]].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in `text`: last `\\boxed{}`, else GSM8K `#### x`, else the last number.

    Returns the raw answer string (LaTeX allowed) or None if nothing answer-like is present.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    hashes = _GSM8K_RE.findall(text)
    if hashes and hashes[-1].strip():
        return hashes[-1].strip()
    last = None
    for match in _NUMBER_RE.finditer(text):
        last = match
    return last.group() if last is not None else None


def gsm8k_gold(answer_field: str) -> str:
    """The gold answer of a GSM8K `answer` field (worked solution ending in `#### n`), e.g. "18"."""
    if not isinstance(answer_field, str):
        raise ValueError(f"answer_field must be a str, got {type(answer_field).__name__}")
    hashes = _GSM8K_RE.findall(answer_field)
    if not hashes or not hashes[-1].strip():
        raise ValueError(f"answer_field has no '#### <answer>' line: {answer_field[-80:]!r}")
    return hashes[-1].strip().replace(",", "")


def parse_plain_number(s: str) -> Decimal | None:
    """`s` as an exact Decimal if it is a plain number (`1,000`, `$18`, `50%`, `3.`), else None.

    `%` is dropped rather than divided out: GSM8K-style golds state percentages as bare numbers.
    """
    s = s.strip()
    if len(s) > 64:  # no plain number is this long; keeps Decimal away from huge inputs
        return None
    for junk in _PLAIN_STRIP:
        s = s.replace(junk, "")
    s = s.strip().rstrip(".").strip()
    if not _PLAIN_NUMBER_RE.fullmatch(s):
        return None
    try:
        return Decimal(s.replace(",", ""))
    except InvalidOperation:
        return None
