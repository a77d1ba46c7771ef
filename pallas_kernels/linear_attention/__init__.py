"""Chunked causal linear attention, hybrid (sliding-window softmax + linear) attention, decode
steps with constant-size state, and LASP-2-style sequence parallelism. Pallas kernels for TPU
(Mosaic) and GPU (Triton) import lazily; the XLA chunked scan is the default everywhere."""

from pallas_kernels.linear_attention import feature_maps
from pallas_kernels.linear_attention.api import (
    IMPLEMENTATIONS,
    linear_attention,
    linear_attention_step,
)
from pallas_kernels.linear_attention.hybrid import (
    HybridState,
    hybrid_attention,
    hybrid_attention_prefill,
    hybrid_attention_step,
    init_hybrid_state,
)
from pallas_kernels.linear_attention.sequence_parallel import linear_attention_sequence_parallel

__all__ = [
    "IMPLEMENTATIONS",
    "HybridState",
    "feature_maps",
    "hybrid_attention",
    "hybrid_attention_prefill",
    "hybrid_attention_step",
    "init_hybrid_state",
    "linear_attention",
    "linear_attention_sequence_parallel",
    "linear_attention_step",
]
