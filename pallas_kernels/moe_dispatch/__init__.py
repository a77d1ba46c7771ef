"""Routed mixture-of-experts dispatch: sort tokens by expert, grouped matmuls, unsort, combine.

Public API:
    moe_ffn(x_TxD, routing, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, *, ...) -> (y_TxD, MoEStats)
    moe_ffn_expert_parallel(...)                   experts sharded over a mesh axis
    gmm(lhs_MxK, rhs_ExKxN, group_sizes_E) -> MxN  grouped matmul (custom_vjp)
    tgmm(lhs_MxK, grad_MxN, group_sizes_E) -> ExKxN
    route_topk, sort_tokens, permute, unsort, combine   the routing plumbing
    moe_ffn_reference, gmm_reference, tgmm_reference    per-expert dense truth
implementation= "xla" (default, jax.lax.ragged_dot) | "pallas_tpu" | "pallas_gpu" | "interpret"
(the TPU kernel in Pallas interpret mode, runs on CPU) | "reference".
"""

from pallas_kernels.moe_dispatch.api import MoEStats, expert_ffn_sorted, moe_ffn
from pallas_kernels.moe_dispatch.expert_parallel import moe_ffn_expert_parallel
from pallas_kernels.moe_dispatch.gmm import IMPLEMENTATIONS, default_implementation, gmm, tgmm
from pallas_kernels.moe_dispatch.reference import gmm_reference, moe_ffn_reference, tgmm_reference
from pallas_kernels.moe_dispatch.routing import (
    Dispatch,
    combine,
    expert_capacity,
    permute,
    route_topk,
    sort_tokens,
    unsort,
)

__all__ = [
    "IMPLEMENTATIONS",
    "Dispatch",
    "MoEStats",
    "combine",
    "default_implementation",
    "expert_capacity",
    "expert_ffn_sorted",
    "gmm",
    "gmm_reference",
    "moe_ffn",
    "moe_ffn_expert_parallel",
    "moe_ffn_reference",
    "permute",
    "route_topk",
    "sort_tokens",
    "tgmm",
    "tgmm_reference",
    "unsort",
]
