"""The annotation prompt, robust parsing of the annotator's JSON, and quote -> span location.

Annotator models quote text instead of giving offsets (models cannot count characters); the
quotes are located in the response here, tolerating whitespace changes, dropped `$` and `...`
elisions. Quotes that cannot be found are dropped and counted.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import re

from jaxtrace.annotate.base import AnnotationRequest, AnnotationResult, failed_result
from jaxtrace.annotate.spans import clean_spans, strip_span

SYSTEM_PROMPT = (
    "You are a meticulous math teacher who marks student solutions. You reply with JSON only."
)

_TASK = {
    "key": (
        "The student's final answer is CORRECT. Quote the key steps of the student response: "
        "the few decisive reasoning steps that make the solution work (at most {max_spans})."
    ),
    "error": (
        "The student's final answer is WRONG. Quote the erroneous step of the student "
        "response: the exact place where the reasoning first goes wrong (at most {max_spans} "
        "quotes, usually one)."
    ),
}

USER_TEMPLATE = """Problem:
{problem}

Reference solution:
{reference}

Student response:
<<<
{response}
>>>

{task}
Copy every quote verbatim from the student response (exact characters, one step each, \
no paraphrase). Reply with JSON only, in this form:
{{"spans": ["<verbatim quote>", "..."]}}"""

# Keys a model might use for its list of quotes.
_LIST_KEYS = (
    "spans",
    "quotes",
    "key_steps",
    "key_spans",
    "steps",
    "error_spans",
    "errors",
    "error",
    "error_step",
    "key_step",
)
_ITEM_KEYS = ("text", "quote", "span", "step")
_MAX_OUTPUT_CHARS = 100_000
_MAX_DECODE_TRIES = 64
_ELLIPSIS_RE = re.compile(r"\s*(?:\.\.\.|…)\s*")


def build_messages(request: AnnotationRequest, max_spans: int = 4) -> list[dict[str, str]]:
    """OpenAI-style chat messages asking for the critical quotes of `request.response`."""
    user = USER_TEMPLATE.format(
        problem=request.problem.strip(),
        reference=request.reference_solution.strip(),
        response=request.response,
        task=_TASK[request.kind].format(max_spans=max_spans),
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def build_prompt_text(request: AnnotationRequest, max_spans: int = 4) -> str:
    """The same prompt as one string (for a policy sampled without a chat template)."""
    system, user = build_messages(request, max_spans)
    return f"{system['content']}\n\n{user['content']}"


ELISION = "\n[... middle of the response left out ...]\n"
PARSE_FAILURE = "no JSON list of quotes in annotator output"


def render_for_policy(request: AnnotationRequest, tokenizer, max_spans: int = 4) -> str:
    """The prompt as the policy reads it: its chat template when it has one, else plain text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(build_messages(request, max_spans))
    return build_prompt_text(request, max_spans)


def build_policy_prompt(
    request: AnnotationRequest, tokenizer, max_tokens: int, max_spans: int = 4
) -> str | None:
    """`render_for_policy` in at most `max_tokens` tokens (the self-annotation sampler's budget).

    A prompt too long is shortened in the middle of the student response (its head and tail
    kept, `ELISION` between them), never in the instructions or the problem; quotes are still
    located in the whole response. None when the prompt without any response does not fit.
    """
    n_tokens = lambda text: len(tokenizer.encode(text))
    full = render_for_policy(request, tokenizer, max_spans)
    if n_tokens(full) <= max_tokens:
        return full
    bare = dataclasses.replace(request, response=ELISION)
    room = max_tokens - n_tokens(render_for_policy(bare, tokenizer, max_spans))
    ids = tokenizer.encode(request.response)
    for _ in range(8):  # re-tokenising at the cut may merge differently: shrink until it fits
        if room <= 0:
            return None
        head, tail = (room + 1) // 2, room // 2
        middle = (
            tokenizer.decode(ids[:head]) + ELISION + tokenizer.decode(ids[-tail:] if tail else [])
        )
        short = render_for_policy(
            dataclasses.replace(request, response=middle), tokenizer, max_spans
        )
        over = n_tokens(short) - max_tokens
        if over <= 0:
            return short
        room -= over
    return None


def _quotes_from_json(value) -> tuple[list[str], int] | None:
    """(quotes, malformed items) from a decoded JSON value, or None if it has no quote list."""
    if isinstance(value, dict):
        lowered = {str(k).lower(): v for k, v in value.items()}
        for key in _LIST_KEYS:
            if key in lowered:
                inner = lowered[key]
                return _quotes_from_json(inner if isinstance(inner, list) else [inner])
        for key in _ITEM_KEYS:
            if isinstance(lowered.get(key), str):
                return [lowered[key]], 0
        return None
    if isinstance(value, list):
        quotes, bad = [], 0
        for item in value:
            if isinstance(item, dict):
                item = next((item[k] for k in _ITEM_KEYS if isinstance(item.get(k), str)), None)
            if isinstance(item, str) and item.strip():
                quotes.append(item)
            else:
                bad += 1
        return quotes, bad
    return None


def parse_quotes(output) -> tuple[list[str], int] | None:
    """(quotes, malformed items) from an annotator's reply, or None if no JSON quote list.

    Tolerates `<think>` blocks, code fences and prose around the JSON, and the list under any
    of several keys or bare. Bounded work on any input.
    """
    if not isinstance(output, str):
        return None
    text = output.rsplit("</think>", 1)[-1][-_MAX_OUTPUT_CHARS:]
    decoder = json.JSONDecoder()
    pos, tries = 0, 0
    while tries < _MAX_DECODE_TRIES:
        starts = [i for i in (text.find("{", pos), text.find("[", pos)) if i >= 0]
        if not starts:
            return None
        start = min(starts)
        tries += 1
        try:
            value, end = decoder.raw_decode(text, start)
        except (json.JSONDecodeError, RecursionError):
            pos = start + 1
            continue
        parsed = _quotes_from_json(value)
        if parsed is not None:
            return parsed
        pos = end
    return None


def _squeeze(text: str) -> tuple[str, list[int]]:
    """`text` without whitespace and `$`, and each kept char's index in `text`."""
    keep = [i for i, c in enumerate(text) if not (c.isspace() or c == "$")]
    return "".join(text[i] for i in keep), keep


class _Locator:
    """Finds quotes in one response: exact first, then ignoring whitespace and `$`."""

    def __init__(self, response: str):
        self.response = response
        self._squeezed: tuple[str, list[int]] | None = None

    def find(self, quote: str, after: int) -> tuple[int, int] | None:
        for lo in (after, 0):  # prefer the occurrence after the previous quote
            i = self.response.find(quote, lo)
            if i >= 0:
                return i, i + len(quote)
        if self._squeezed is None:
            self._squeezed = _squeeze(self.response)
        squeezed, index = self._squeezed
        q, _ = _squeeze(quote)
        if not q:
            return None
        lo_sq = bisect.bisect_left(index, after)
        for lo in (lo_sq, 0):
            j = squeezed.find(q, lo)
            if j >= 0:
                return index[j], index[j + len(q) - 1] + 1
        return None

    def locate(self, quote: str, after: int) -> tuple[int, int] | None:
        quote = quote.strip()
        span = self.find(quote, after)
        if span is None and _ELLIPSIS_RE.search(quote):
            # "x = 3 ... so y = 6": from the first part to the last part after it.
            parts = [p for p in _ELLIPSIS_RE.split(quote) if p]
            if len(parts) >= 2:
                first = self.find(parts[0], after)
                last = first and self.find(parts[-1], first[1])
                if first and last and last[0] >= first[1]:
                    span = first[0], last[1]
        return span


def locate_quotes(response: str, quotes: list[str]) -> tuple[list[tuple[int, int]], int]:
    """Character spans of `quotes` in `response` (merged, whitespace-trimmed) and #not found."""
    locator = _Locator(response)
    spans, dropped, after = [], 0, 0
    for quote in quotes:
        span = locator.locate(quote, after) if isinstance(quote, str) and quote.strip() else None
        if span is None:
            dropped += 1
            continue
        span = strip_span(response, *span)
        if span[0] < span[1]:
            spans.append(span)
            after = span[1]
        else:
            dropped += 1
    merged, bad = clean_spans(spans, len(response))
    return merged, dropped + bad


def result_from_output(request: AnnotationRequest, output) -> AnnotationResult:
    """Parses an annotator reply for `request`; unparseable output gives status 'failed'."""
    parsed = parse_quotes(output)
    if parsed is None:
        return failed_result(request, "failed", PARSE_FAILURE)
    quotes, malformed = parsed
    spans, not_found = locate_quotes(request.response, quotes)
    return AnnotationResult(
        spans=tuple(spans), kind=request.kind, status="ok", dropped_spans=malformed + not_found
    )
