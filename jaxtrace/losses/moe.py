"""Mixture-of-experts router losses and load metrics: pure functions of router logits and counts.

Shape letters: T tokens, E experts, K experts per token, L layers. `mask_T` (1 = real token,
0 = padding) excludes tokens everywhere it is accepted. Everything is computed in float32.

  router_topk                     HF Qwen3-MoE router (softmax in fp32, top-k, renormalise)
  load_balancing_loss             HF / Switch: E * sum_i f_i p_i over this batch
  global_load_balancing_loss      same, f_i over the global batch ("Demons in the Detail")
  router_z_loss                   ST-MoE: mean logsumexp(logits)^2
  aux_free_bias_update            DeepSeek-V3 selection-bias update
  expert_counts / expert_load_metrics   per-layer load and imbalance
"""

import jax
import jax.numpy as jnp

from pallas_kernels.moe_dispatch.routing import route_topk

router_topk = route_topk
"""(router_logits_TxE, top_k, *, norm_topk_prob=True, selection_bias_E=None, score_fn="softmax")
-> (topk_weights_TxK, topk_ids_TxK, scores_TxE); see `pallas_kernels.moe_dispatch.route_topk`."""


def _mask_or_ones(mask_T, num_tokens):
    if mask_T is None:
        return jnp.ones((num_tokens,), jnp.float32)
    if mask_T.shape != (num_tokens,):
        raise ValueError(f"mask_T must have shape ({num_tokens},), got {mask_T.shape}")
    return mask_T.astype(jnp.float32)


def _flatten_layers(router_logits, mask_T):
    """[T, E] or [L, T, E] -> ([L*T, E], mask [L*T]) with the token mask repeated per layer."""
    if router_logits.ndim == 2:
        return router_logits, _mask_or_ones(mask_T, router_logits.shape[0])
    if router_logits.ndim != 3:
        raise ValueError(f"router_logits must be [T, E] or [L, T, E], got {router_logits.shape}")
    num_layers, num_tokens, num_experts = router_logits.shape
    mask = jnp.tile(_mask_or_ones(mask_T, num_tokens), num_layers)
    return router_logits.reshape(num_layers * num_tokens, num_experts), mask


def expert_counts(topk_ids_TxK, num_experts, mask_T=None):
    """Assignments per expert [E] (float32), padding tokens excluded."""
    if topk_ids_TxK.ndim != 2:
        raise ValueError(f"topk_ids_TxK must be [T, K], got shape {topk_ids_TxK.shape}")
    mask = _mask_or_ones(mask_T, topk_ids_TxK.shape[0])
    onehot_TxKxE = jax.nn.one_hot(topk_ids_TxK, num_experts, dtype=jnp.float32)
    return jnp.einsum("tke,t->e", onehot_TxKxE, mask)


def load_balancing_loss(router_logits, top_k, *, mask_T=None):
    """Switch-style auxiliary loss exactly as Hugging Face's `load_balancing_loss_func`.

    loss = E * sum_i f_i * p_i with, over all (layer, token) rows of this batch,
      f_i = (# top-k assignments to expert i) / (# tokens)   (sums to K, not 1: HF convention)
      p_i = mean softmax probability of expert i.
    router_logits: [T, E], or [L, T, E] for HF's concatenation over layers. Scale by the config's
    `router_aux_loss_coef` outside. Gradient flows through p only.
    """
    logits_NxE, mask_N = _flatten_layers(router_logits, mask_T)
    probs_NxE = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
    _, ids_NxK = jax.lax.top_k(probs_NxE, top_k)
    num_tokens = jnp.maximum(jnp.sum(mask_N), 1.0)
    f_E = expert_counts(ids_NxK, logits_NxE.shape[-1], mask_N) / num_tokens
    p_E = jnp.einsum("ne,n->e", probs_NxE, mask_N) / num_tokens
    return logits_NxE.shape[-1] * jnp.sum(f_E * p_E)


def global_load_balancing_loss(router_logits, counts_E, top_k, *, mask_T=None, axis_name=None):
    """Global-batch load-balancing loss (Qwen, "Demons in the Detail", 2025).

    Same E * sum_i f_i p_i, but f_i comes from `counts_E`: top-k assignment counts accumulated
    over every micro-batch of the global batch (sum `expert_counts` / `MoEStats` over them) and,
    with `axis_name`, psum-ed over data-parallel devices here. p_i is this micro-batch's (local)
    mean router probability, which carries the gradient. f_i = counts_i * K / sum(counts), i.e.
    per global token, so with one micro-batch on one device this equals `load_balancing_loss`.
    router_logits: [T, E] or [L, T, E] (then counts_E are summed over the same layers).
    """
    logits_NxE, mask_N = _flatten_layers(router_logits, mask_T)
    num_experts = logits_NxE.shape[-1]
    if counts_E.shape != (num_experts,):
        raise ValueError(f"counts_E must have shape ({num_experts},), got {counts_E.shape}")
    counts_E = jax.lax.stop_gradient(counts_E.astype(jnp.float32))
    if axis_name is not None:
        counts_E = jax.lax.psum(counts_E, axis_name)
    f_E = counts_E * top_k / jnp.maximum(jnp.sum(counts_E), 1.0)
    probs_NxE = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
    p_E = jnp.einsum("ne,n->e", probs_NxE, mask_N) / jnp.maximum(jnp.sum(mask_N), 1.0)
    return num_experts * jnp.sum(f_E * p_E)


def router_z_loss(router_logits, *, mask_T=None):
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 ([T, E] or [L, T, E])."""
    logits_NxE, mask_N = _flatten_layers(router_logits, mask_T)
    z_N = jax.nn.logsumexp(logits_NxE.astype(jnp.float32), axis=-1)
    return jnp.sum(z_N**2 * mask_N) / jnp.maximum(jnp.sum(mask_N), 1.0)


def aux_free_bias_update(bias_E, counts_E, rate, *, axis_name=None):
    """DeepSeek-V3 auxiliary-loss-free balancing: one update of the selection bias.

    bias_i += rate * sign(mean_j c_j - c_i): overloaded experts become less likely to be picked,
    underloaded ones more. The bias only enters top-k selection (`router_topk(...,
    selection_bias_E=bias)`), never the combine weights. Call once per step with that step's
    counts ([E], or [L, E] with a [L, E] bias); `axis_name` sums counts over data parallelism.
    """
    if bias_E.shape != counts_E.shape:
        raise ValueError(f"bias_E shape {bias_E.shape} must equal counts_E shape {counts_E.shape}")
    counts_E = counts_E.astype(jnp.float32)
    if axis_name is not None:
        counts_E = jax.lax.psum(counts_E, axis_name)
    error_E = jnp.mean(counts_E, axis=-1, keepdims=True) - counts_E
    return (bias_E + rate * jnp.sign(error_E)).astype(bias_E.dtype)


def expert_load_metrics(counts_E):
    """Load and imbalance from per-expert counts [E] or per-layer [L, E].

    Returns a dict of float32 arrays ([] or [L]), plus `load` ([E] / [L, E], fraction of
    assignments per expert):
      max_over_mean  max_i c_i / mean c (1 = perfectly balanced)
      min_over_mean  min_i c_i / mean c
      max_violation  (max_i c_i - mean c) / mean c, DeepSeek's MaxVio
      cv             std / mean of c
    """
    counts = counts_E.astype(jnp.float32)
    mean = jnp.maximum(jnp.mean(counts, axis=-1), 1e-9)
    return {
        "load": counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1e-9),
        "max_over_mean": jnp.max(counts, axis=-1) / mean,
        "min_over_mean": jnp.min(counts, axis=-1) / mean,
        "max_violation": jnp.max(counts, axis=-1) / mean - 1.0,
        "cv": jnp.std(counts, axis=-1) / mean,
    }
