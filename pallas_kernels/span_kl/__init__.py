"""Span-routed exact KL (and token log-probs) over the vocabulary without [T, V] logits.

from pallas_kernels.span_kl import span_kl, token_logprobs, ROUTE_FKL
kl_T = span_kl(h_student_TxD, w_DxV, route_T, h_teacher_TxD=h_teacher_TxD)
"""

from pallas_kernels.span_kl.api import (
    DEFAULT_BLOCKS,
    IMPLEMENTATIONS,
    default_implementation,
    span_kl,
    token_logprobs,
)
from pallas_kernels.span_kl.reference import ROUTE_FKL, ROUTE_NONE, ROUTE_RKL

__all__ = [
    "DEFAULT_BLOCKS",
    "IMPLEMENTATIONS",
    "ROUTE_FKL",
    "ROUTE_NONE",
    "ROUTE_RKL",
    "default_implementation",
    "span_kl",
    "token_logprobs",
]
