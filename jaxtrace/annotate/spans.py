"""Character spans: validation, and mapping to token labels through tokenizer offsets.

Mapping rule: token i, covering characters [s_i, e_i) of the response, is inside span [a, b)
iff they share at least one character: max(s_i, a) < min(e_i, b). Consequences, all tested:
  * a span ending mid-token includes that whole token (a partial token still carries the step);
  * a span starting exactly at a token boundary does not include the token before it;
  * zero-width spans (a == b) and zero-width tokens (special tokens, offsets (0, 0)) never match;
  * with `text` given, leading/trailing whitespace is trimmed off each span first, so a quote
    that ends in a space does not pull in the next token whose text starts with that space.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def _as_int(x) -> int | None:
    """`x` as a Python int if it is an integer (not bool, not float), else None."""
    if isinstance(x, bool | np.bool_):
        return None
    if isinstance(x, int | np.integer):
        return int(x)
    return None


def clean_spans(spans: Iterable, text_len: int | None = None) -> tuple[list[tuple[int, int]], int]:
    """Valid spans sorted and merged, plus the number of malformed spans dropped.

    Malformed: not a pair, a bound that is not an int (floats, NaN, bools, strings),
    start < 0, start > end, or end past `text_len` (when given). Zero-width spans are valid
    but cover nothing, so they are removed without being counted. Never raises on span
    contents: spans come from model output.
    """
    if text_len is not None and (_as_int(text_len) is None or text_len < 0):
        raise ValueError(f"text_len must be a non-negative int, got {text_len!r}")
    good: list[tuple[int, int]] = []
    dropped = 0
    try:
        items = list(spans) if spans is not None else []
    except TypeError:  # not iterable at all: one malformed thing
        return [], 1
    for item in items:
        try:
            a, b = item
        except (TypeError, ValueError):
            dropped += 1
            continue
        a, b = _as_int(a), _as_int(b)
        if a is None or b is None or a < 0 or a > b or (text_len is not None and b > text_len):
            dropped += 1
            continue
        if a < b:
            good.append((a, b))
    good.sort()
    merged: list[tuple[int, int]] = []
    for a, b in good:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged, dropped


def strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """[start, end) shrunk to exclude leading and trailing whitespace of `text`."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def char_spans_to_token_mask(
    spans: Iterable,
    offsets_Tx2,
    num_tokens: int,
    *,
    text: str | None = None,
    return_dropped: bool = False,
):
    """bool[num_tokens]: True for tokens overlapping any character span (rule in module doc).

    Args:
      spans: iterable of (start, end) character ranges into the response text; malformed
        ones are dropped (see `clean_spans`), never raised on.
      offsets_Tx2: int[T, 2] (char_start, char_end) of each response token in the response
        text, as from a tokenizer's `return_offsets_mapping`. T <= num_tokens; positions
        T..num_tokens-1 (padding) are False.
      num_tokens: length of the output mask.
      text: the response text; enables end-of-text validation and whitespace trimming.
      return_dropped: also return the number of malformed spans dropped.

    Returns:
      mask bool[num_tokens], or (mask, num_dropped) with `return_dropped`.
    """
    if _as_int(num_tokens) is None or num_tokens < 0:
        raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
    offsets_Tx2 = np.asarray(offsets_Tx2)
    if offsets_Tx2.size == 0:
        offsets_Tx2 = offsets_Tx2.reshape(0, 2)
    if offsets_Tx2.ndim != 2 or offsets_Tx2.shape[1] != 2:
        raise ValueError(f"offsets_Tx2 must have shape [T, 2], got {offsets_Tx2.shape}")
    if not np.issubdtype(offsets_Tx2.dtype, np.integer):
        raise ValueError(f"offsets_Tx2 must be integer, got dtype {offsets_Tx2.dtype}")
    if offsets_Tx2.shape[0] > num_tokens:
        raise ValueError(
            f"offsets_Tx2 has {offsets_Tx2.shape[0]} tokens, more than num_tokens={num_tokens}"
        )
    if text is not None and not isinstance(text, str):
        raise ValueError(f"text must be a str or None, got {type(text).__name__}")
    spans, dropped = clean_spans(spans, None if text is None else len(text))
    if text is not None:
        spans = [s for s in (strip_span(text, a, b) for a, b in spans) if s[0] < s[1]]
    start_T, end_T = offsets_Tx2[:, 0], offsets_Tx2[:, 1]
    hit_T = np.zeros(offsets_Tx2.shape[0], dtype=bool)
    for a, b in spans:
        hit_T |= (np.maximum(start_T, a) < np.minimum(end_T, b)) & (start_T < end_T)
    mask = np.zeros(num_tokens, dtype=bool)
    mask[: hit_T.shape[0]] = hit_T
    return (mask, dropped) if return_dropped else mask


def token_mask_to_spans(mask_T) -> list[tuple[int, int]]:
    """Maximal runs of True in a 1-D mask as half-open (start, end) token index pairs."""
    mask_T = np.asarray(mask_T, dtype=bool)
    if mask_T.ndim != 1:
        raise ValueError(f"mask_T must be 1-D, got shape {mask_T.shape}")
    padded = np.concatenate([[False], mask_T, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]
