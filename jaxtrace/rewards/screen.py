"""Host-side cleaning and screening of answers before they reach math-verify (linear-time string
work, no sympy, no eval).

`normalize` removes what a reader does not see but a string match does: zero-width and other
format characters (U+200B, U+FEFF, bidi marks, soft hyphens...), odd spaces, fullwidth ASCII,
the Unicode minus. It does not apply NFKC, which would turn `x²` into `x2`.

`reject_reason` names answers that would only waste a worker's time budget or that look like
code rather than mathematics: numeric power towers (`9^9^9^9`), powers and factorials with
astronomically many digits, and Python-ish payloads (`__import__`, `lambda`, `exec(`...).
math-verify does not evaluate Python, so the last is defence in depth, not the only guard.
"""

from __future__ import annotations

import math
import re
import unicodedata

# Spaces a tokenizer may emit that are not U+0020.
_SPACES = dict.fromkeys(
    [0x00A0, 0x1680, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000, 0x2028, 0x2029], " "
)
_FULLWIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}  # ！..～ -> !..~
_MINUS = {0x2212: "-", 0x2012: "-", 0x2013: "-", 0xFE63: "-", 0xFF0D: "-"}
_TRANSLATE = {**_SPACES, **_FULLWIDTH, **_MINUS}

_POW = r"(?:\^|\*\*)"
# On the answer with braces, brackets, spaces and \left / \right removed: a power of a power
# with numbers (9^9^9), or any chain of three powers (e^e^e^e; e^{x^2} is fine).
_TOWER_RE = re.compile(rf"\d{_POW}[-+]?\d+{_POW}|[\w.]{_POW}[-+]?[\w.]+{_POW}[-+]?[\w.]+{_POW}")
_POWER_RE = re.compile(rf"(\d+(?:\.\d+)?){_POW}(\d+)")
_FACTORIAL_RE = re.compile(r"(\d+)!")
_CODE_RE = re.compile(
    r"__|(?<![\\\w])(?:import|lambda|exec|eval|compile|open|globals|locals|getattr|setattr|"
    r"subprocess|system|popen|builtins)\b|\\(?:write18|input|include|openin|openout|immediate)\b"
)

MAX_DIGITS = 100_000  # a power or factorial with more digits than this is not an answer


def normalize(text: str) -> str:
    """`text` without format (Cf) characters, with odd spaces, fullwidth ASCII and Unicode
    minus signs mapped to ASCII."""
    if text.isascii():
        return text
    text = text.translate(_TRANSLATE)
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf")


def reject_reason(answer: str) -> str | None:
    """Why `answer` is not sent to math-verify (scored 0), or None."""
    if _CODE_RE.search(answer):
        return "looks like code"
    flat = re.sub(r"\\left|\\right|[\s{}()\[\]]", "", answer)
    if _TOWER_RE.search(flat):
        return "numeric power tower"
    for base, exp in _POWER_RE.findall(flat):
        b = float(base)
        if b > 1 and len(exp) > 7 or (b > 1 and int(exp) * math.log10(b) > MAX_DIGITS):
            return f"power with more than {MAX_DIGITS} digits"
    for n in _FACTORIAL_RE.findall(flat):
        if len(n) > 6 or int(n) > 25_000:  # 25000! has about 100k digits
            return f"factorial with more than {MAX_DIGITS} digits"
    return None
