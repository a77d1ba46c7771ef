"""Token routing and the sort / unsort around the grouped matmuls (pure jnp, any backend).

Shape letters: T tokens, K experts per token (top-k), E experts, M = T * K routed rows, D model
width. A flat assignment index is `t * K + k`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Dispatch(NamedTuple):
    """Where each routed row goes. All int32; a pytree, so it can cross `jit`.

    order_M: sorted row m holds flat assignment `order_M[m]` (rows grouped by expert, kept rows
        first in expert order, then dropped / invalid ones).
    token_idx_M: source token of sorted row m (`order_M // K`).
    inverse_M: position in sorted order of flat assignment i (`order_M` inverted).
    group_sizes_E: kept rows per expert (what the grouped matmul computes).
    tokens_per_expert_E: valid assignments per expert before any capacity drop.
    kept_TxK: 1 where the assignment is computed, 0 where dropped or invalid.
    """

    order_M: jax.Array
    token_idx_M: jax.Array
    inverse_M: jax.Array
    group_sizes_E: jax.Array
    tokens_per_expert_E: jax.Array
    kept_TxK: jax.Array


def route_topk(
    router_logits_TxE, top_k, *, norm_topk_prob=True, selection_bias_E=None, score_fn="softmax"
):
    """Router top-k, equal to Hugging Face Qwen3-MoE's when `score_fn="softmax"` and no bias.

    Scores are computed in float32 (softmax over experts, or sigmoid for DeepSeek-V3-style
    routers). `selection_bias_E` (aux-loss-free balancing) is added to the scores only to pick the
    experts; the returned weights are the unbiased scores of the picked experts, renormalised to
    sum to 1 when `norm_topk_prob`.

    Returns (topk_weights_TxK float32, topk_ids_TxK int32, scores_TxE float32).
    """
    if router_logits_TxE.ndim != 2:
        raise ValueError(f"router_logits_TxE must be [T, E], got shape {router_logits_TxE.shape}")
    num_experts = router_logits_TxE.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    logits = router_logits_TxE.astype(jnp.float32)
    if score_fn == "softmax":
        scores_TxE = jax.nn.softmax(logits, axis=-1)
    elif score_fn == "sigmoid":
        scores_TxE = jax.nn.sigmoid(logits)
    else:
        raise ValueError(f"score_fn must be 'softmax' or 'sigmoid', got {score_fn!r}")
    if selection_bias_E is None:
        topk_weights_TxK, topk_ids_TxK = jax.lax.top_k(scores_TxE, top_k)
    else:
        if selection_bias_E.shape != (num_experts,):
            raise ValueError(
                f"selection_bias_E must have shape ({num_experts},), got {selection_bias_E.shape}"
            )
        # The bias only steers selection; it must not leak into the weights or their gradient.
        biased = scores_TxE + jax.lax.stop_gradient(selection_bias_E.astype(jnp.float32))
        _, topk_ids_TxK = jax.lax.top_k(biased, top_k)
        topk_weights_TxK = jnp.take_along_axis(scores_TxE, topk_ids_TxK, axis=-1)
    if norm_topk_prob:
        topk_weights_TxK = topk_weights_TxK / jnp.sum(topk_weights_TxK, axis=-1, keepdims=True)
    return topk_weights_TxK, topk_ids_TxK.astype(jnp.int32), scores_TxE


def expert_capacity(num_tokens, top_k, num_experts, capacity_factor):
    """Static per-expert capacity: ceil(capacity_factor * T * K / E), at least 1."""
    if capacity_factor is None:
        return None
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
    return max(1, -(-int(capacity_factor * num_tokens * top_k) // num_experts))


def sort_tokens(topk_ids_TxK, num_experts, *, valid_TxK=None, capacity=None):
    """Groups routed rows by expert. Dropless unless `capacity` (rows per expert) is given.

    Within an expert, rows keep token order, so a capacity drop removes the latest tokens
    (first come, first served, as in Switch / GShard). Invalid (`valid_TxK == 0`) and dropped
    rows are sorted after every kept row, where the grouped matmul neither reads nor writes.
    """
    if topk_ids_TxK.ndim != 2:
        raise ValueError(f"topk_ids_TxK must be [T, K], got shape {topk_ids_TxK.shape}")
    if valid_TxK is not None and valid_TxK.shape != topk_ids_TxK.shape:
        raise ValueError(
            f"valid_TxK shape {valid_TxK.shape} must equal topk_ids_TxK shape {topk_ids_TxK.shape}"
        )
    if capacity is not None and capacity < 0:
        raise ValueError(f"capacity must be >= 0 or None, got {capacity}")
    top_k = topk_ids_TxK.shape[1]
    ids_M = topk_ids_TxK.reshape(-1).astype(jnp.int32)
    valid_M = (ids_M >= 0) & (ids_M < num_experts)
    if valid_TxK is not None:
        valid_M &= valid_TxK.reshape(-1).astype(bool)
    # Expert id `num_experts` is the sentinel bucket that sorts last.
    key_M = jnp.where(valid_M, ids_M, num_experts)
    tokens_per_expert_E = jnp.zeros(num_experts + 1, jnp.int32).at[key_M].add(1)[:num_experts]
    order_M = jnp.argsort(key_M, stable=True).astype(jnp.int32)
    kept_M = valid_M
    group_sizes_E = tokens_per_expert_E
    if capacity is not None:
        starts_E1 = jnp.cumsum(tokens_per_expert_E) - tokens_per_expert_E
        starts_E1 = jnp.concatenate([starts_E1, jnp.zeros(1, jnp.int32)])
        rank_sorted_M = jnp.arange(ids_M.shape[0], dtype=jnp.int32) - starts_E1[key_M[order_M]]
        rank_M = jnp.zeros_like(rank_sorted_M).at[order_M].set(rank_sorted_M)
        kept_M = valid_M & (rank_M < capacity)
        order_M = jnp.argsort(jnp.where(kept_M, key_M, num_experts), stable=True).astype(jnp.int32)
        group_sizes_E = jnp.minimum(tokens_per_expert_E, capacity)
    inverse_M = (
        jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.shape[0], dtype=jnp.int32))
    )
    return Dispatch(
        order_M=order_M,
        token_idx_M=order_M // top_k,
        inverse_M=inverse_M,
        group_sizes_E=group_sizes_E.astype(jnp.int32),
        tokens_per_expert_E=tokens_per_expert_E,
        kept_TxK=kept_M.reshape(topk_ids_TxK.shape).astype(jnp.int32),
    )


def permute(x_TxD, dispatch):
    """Gathers token rows into expert order: [T, D] -> [M, D]."""
    return jnp.take(x_TxD, dispatch.token_idx_M, axis=0)


def unsort(y_MxD, dispatch):
    """Inverse of the sort: [M, D] rows in expert order -> [T, K, D] in assignment order."""
    num_tokens, top_k = dispatch.kept_TxK.shape
    return jnp.take(y_MxD, dispatch.inverse_M, axis=0).reshape(num_tokens, top_k, -1)


def combine(y_TxKxD, topk_weights_TxK, dispatch, out_dtype=None):
    """Weighted sum over the k experts of each token (float32 accumulation) -> [T, D].

    Dropped and invalid rows get weight 0, so a dropped assignment adds nothing (the token keeps
    only its residual path there).
    """
    weights = topk_weights_TxK.astype(jnp.float32) * dispatch.kept_TxK.astype(jnp.float32)
    y_TxD = jnp.einsum("tkd,tk->td", y_TxKxD.astype(jnp.float32), weights)
    return y_TxD.astype(out_dtype or y_TxKxD.dtype)
