"""Span annotators (file, OpenAI-compatible HTTP, self-annotation, divergence) and span -> token
mapping. Correct rollouts get "key" spans, wrong ones "error" spans."""

from jaxtrace.annotate.base import (
    STATUSES,
    AnnotationRequest,
    AnnotationResult,
    Annotator,
    AnnotatorStats,
)
from jaxtrace.annotate.divergence import divergence_mask, divergence_spans
from jaxtrace.annotate.file import FileAnnotator, request_key
from jaxtrace.annotate.http_api import OpenAIAnnotator
from jaxtrace.annotate.prompt import (
    SYSTEM_PROMPT,
    build_messages,
    build_prompt_text,
    locate_quotes,
    parse_quotes,
)
from jaxtrace.annotate.self_annotate import SelfAnnotator
from jaxtrace.annotate.spans import (
    char_spans_to_token_mask,
    clean_spans,
    strip_span,
    token_mask_to_spans,
)

__all__ = [
    "STATUSES",
    "SYSTEM_PROMPT",
    "AnnotationRequest",
    "AnnotationResult",
    "Annotator",
    "AnnotatorStats",
    "FileAnnotator",
    "OpenAIAnnotator",
    "SelfAnnotator",
    "build_messages",
    "build_prompt_text",
    "char_spans_to_token_mask",
    "clean_spans",
    "divergence_mask",
    "divergence_spans",
    "locate_quotes",
    "parse_quotes",
    "request_key",
    "strip_span",
    "token_mask_to_spans",
]
