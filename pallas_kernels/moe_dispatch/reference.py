"""Per-expert dense references: the definition of truth for `moe_dispatch`.

Nothing here sorts tokens: every expert runs on every row and a one-hot mask picks the result,
so these share no code path with the grouped-matmul implementations they check.
"""

import jax
import jax.numpy as jnp


def row_groups(group_sizes_E, num_rows):
    """Group id of each row [M] (int32); rows past sum(group_sizes) get id E."""
    ends_E = jnp.cumsum(group_sizes_E.astype(jnp.int32))
    return jnp.searchsorted(ends_E, jnp.arange(num_rows, dtype=jnp.int32), side="right")


def gmm_reference(lhs_MxK, rhs_ExKxN, group_sizes_E, *, preferred_element_type=None):
    """out[m] = lhs[m] @ rhs[group(m)]; rows past sum(group_sizes) are 0. [M, N]."""
    num_experts = rhs_ExKxN.shape[0]
    onehot_MxE = jax.nn.one_hot(row_groups(group_sizes_E, lhs_MxK.shape[0]), num_experts)
    out_ExMxN = jnp.einsum("mk,ekn->emn", lhs_MxK, rhs_ExKxN, preferred_element_type=jnp.float32)
    out_MxN = jnp.einsum("me,emn->mn", onehot_MxE, out_ExMxN)
    return out_MxN.astype(preferred_element_type or lhs_MxK.dtype)


def tgmm_reference(lhs_MxK, grad_MxN, group_sizes_E, *, preferred_element_type=None):
    """out[e] = lhs[rows of e]^T @ grad[rows of e]; empty groups are 0. [E, K, N]."""
    num_experts = group_sizes_E.shape[0]
    onehot_MxE = jax.nn.one_hot(row_groups(group_sizes_E, lhs_MxK.shape[0]), num_experts)
    out_ExKxN = jnp.einsum(
        "me,mk,mn->ekn", onehot_MxE, lhs_MxK, grad_MxN, preferred_element_type=jnp.float32
    )
    return out_ExKxN.astype(preferred_element_type or lhs_MxK.dtype)


def capacity_keep_mask(topk_ids_TxK, num_experts, capacity):
    """1 where an assignment fits its expert's capacity, counting in flat (t, k) order. [T, K]."""
    onehot_MxE = jax.nn.one_hot(topk_ids_TxK.reshape(-1), num_experts, dtype=jnp.int32)
    rank_M = jnp.sum((jnp.cumsum(onehot_MxE, axis=0) - 1) * onehot_MxE, axis=-1)
    valid_M = jnp.sum(onehot_MxE, axis=-1) > 0
    keep_M = valid_M if capacity is None else valid_M & (rank_M < capacity)
    return keep_M.reshape(topk_ids_TxK.shape).astype(jnp.int32)


def moe_ffn_reference(
    x_TxD, topk_weights_TxK, topk_ids_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, *, capacity=None
):
    """Routed SwiGLU experts, dense: every expert on every token, masked by the routing.

    y[t] = sum_k w[t,k] * (silu(x[t] Wg[e]) * (x[t] Wu[e])) Wd[e], e = ids[t,k], over kept
    assignments. The expert hidden is cast to x's dtype before the down projection (as a bf16
    Hugging Face model does); accumulation is float32. Returns [T, D] in x's dtype.
    """
    num_experts = w_gate_ExDxF.shape[0]
    keep_TxK = capacity_keep_mask(topk_ids_TxK, num_experts, capacity)
    combine_TxE = jnp.einsum(
        "tk,tke->te",
        topk_weights_TxK.astype(jnp.float32) * keep_TxK,
        jax.nn.one_hot(topk_ids_TxK, num_experts),
    )
    f32 = jnp.float32
    gate_ExTxF = jnp.einsum("td,edf->etf", x_TxD, w_gate_ExDxF, preferred_element_type=f32)
    up_ExTxF = jnp.einsum("td,edf->etf", x_TxD, w_up_ExDxF, preferred_element_type=f32)
    hidden_ExTxF = (jax.nn.silu(gate_ExTxF) * up_ExTxF).astype(x_TxD.dtype)
    out_ExTxD = jnp.einsum("etf,efd->etd", hidden_ExTxF, w_down_ExFxD, preferred_element_type=f32)
    return jnp.einsum("te,etd->td", combine_TxE, out_ExTxD).astype(x_TxD.dtype)
