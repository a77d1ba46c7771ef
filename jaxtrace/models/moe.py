"""Qwen3-MoE routed experts layer, numerically equal to Hugging Face `Qwen3MoeSparseMoeBlock`.

Router: logits = x @ W_router in the compute dtype (HF's `F.linear`), softmax in float32, top-k,
renormalised to sum 1 when `norm_topk_prob`, cast back to the compute dtype. Experts: SwiGLU per
expert, dispatched through `pallas_kernels.moe_dispatch.moe_ffn` (sort -> grouped matmuls ->
unsort -> weighted combine), dropless unless `moe_capacity_factor` is set.

Params (HF names in `jaxtrace.models.hf._moe_mlp_rows`):
  router     [D, E]     ("embed", "expert")
  gate_proj  [E, D, F]  ("expert", "embed", "mlp")
  up_proj    [E, D, F]  ("expert", "embed", "mlp")
  down_proj  [E, F, D]  ("expert", "mlp", "embed")

`MoeMLP.__call__` returns (y, aux); aux holds the router statistics that the training losses
need (`router_aux_loss` turns the per-layer list into the load-balancing loss and metrics).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrace.losses import moe as moe_losses
from jaxtrace.models.config import ModelConfig
from jaxtrace.models.qwen3 import _param
from pallas_kernels import moe_dispatch


class MoeMLP(nnx.Module):
    """Top-k routed SwiGLU experts."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, e, pd = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.weight_dtype
        if f <= 0:
            raise ValueError(f"ModelConfig.moe_intermediate_size={f} must be positive for MoE")
        self.router = _param(rngs, (d, e), ("embed", "expert"), pd)
        self.gate_proj = _param(rngs, (e, d, f), ("expert", "embed", "mlp"), pd)
        self.up_proj = _param(rngs, (e, d, f), ("expert", "embed", "mlp"), pd)
        self.down_proj = _param(rngs, (e, f, d), ("expert", "mlp", "embed"), pd)
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.implementation = cfg.moe_implementation or None
        self.capacity_factor = cfg.moe_capacity_factor or None
        self.dtype = cfg.compute_dtype

    def __call__(self, x_BxTxD):
        """x [B, T, D] -> (y [B, T, D], aux) with aux:
        router_logits_BxTxE (float32), topk_ids_BxTxK (int32), tokens_per_expert_E (int32,
        every token, padding included: mask with `router_aux_loss` for training metrics)."""
        dt = self.dtype
        b, t, d = x_BxTxD.shape
        x_TxD = x_BxTxD.reshape(b * t, d).astype(dt)
        # Logits in the compute dtype, as HF's F.linear; the softmax then runs in float32.
        logits_TxE = x_TxD @ self.router[...].astype(dt)
        weights_TxK, ids_TxK, _ = moe_dispatch.route_topk(
            logits_TxE, self.top_k, norm_topk_prob=self.norm_topk_prob
        )
        y_TxD, stats = moe_dispatch.moe_ffn(
            x_TxD,
            (weights_TxK.astype(dt), ids_TxK),  # HF casts the weights back to the logits dtype
            self.gate_proj[...].astype(dt),
            self.up_proj[...].astype(dt),
            self.down_proj[...].astype(dt),
            implementation=self.implementation,
            capacity_factor=self.capacity_factor,
        )
        aux = {
            "router_logits_BxTxE": logits_TxE.astype(jnp.float32).reshape(b, t, -1),
            "topk_ids_BxTxK": ids_TxK.reshape(b, t, -1),
            "tokens_per_expert_E": stats.tokens_per_expert_E,
        }
        return y_TxD.reshape(b, t, d), aux


def router_aux_loss(cfg: ModelConfig, aux_layers, valid_BxT):
    """Load-balancing loss and load metrics from `Qwen3(..., return_aux=True)`'s per-layer aux.

    Args:
      cfg: the model config (num_experts_per_tok, moe_global_lbl).
      aux_layers: one entry per decoder layer, None for dense layers.
      valid_BxT: 1 for real tokens; padding counts neither in the loss nor in the loads.
    Returns:
      (loss, metrics). loss is the unscaled balancing loss (multiply by
      `cfg.router_aux_loss_coef`); 0 when no layer is MoE. With `moe_global_lbl=False` it is
      exactly HF's `load_balancing_loss_func` over this batch (all MoE layers' rows pooled);
      with True, each layer is balanced on its own over the whole step batch (every
      data-parallel shard: the step is one global jit program), f_i from the layer's top-k
      counts (Qwen's global-batch balancing), and the per-layer losses are averaged.
      metrics: `moe/load_imbalance_layer{i}` (max / mean expert load of layer i),
      `moe/load_imbalance` (their mean), `moe/lbl_loss`.
    """
    stats = router_stats(aux_layers, valid_BxT)
    if stats is None:
        return jnp.float32(0.0), {}
    loss = router_loss_from_stats(cfg, stats)
    return loss, router_metrics_from_stats(cfg, stats)


def router_stats(aux_layers, valid_BxT):
    """The sums the load-balancing loss and the load metrics are functions of; each adds up over
    the micro-batches of a batch (jaxtrace.microbatch), so the whole batch's loss is exact:

      layers: static tuple of the MoE layers' indices
      counts_LxE: top-k assignments per expert (float32, no gradient)
      probs_LxE: sum over real tokens of the router's softmax probabilities (the gradient's path)
      tokens: real tokens (float32 scalar)

    None when no layer is MoE. aux_layers / valid_BxT as `router_aux_loss`.
    """
    moe = [(i, a) for i, a in enumerate(aux_layers) if a is not None]
    if not moe:
        return None
    mask_N = valid_BxT.reshape(-1).astype(jnp.float32)
    logits_LxNxE = jnp.stack([a["router_logits_BxTxE"] for _, a in moe])
    logits_LxNxE = logits_LxNxE.reshape(len(moe), mask_N.shape[0], -1)
    num_experts = logits_LxNxE.shape[-1]
    counts_LxE = jnp.stack(
        [
            moe_losses.expert_counts(
                a["topk_ids_BxTxK"].reshape(mask_N.shape[0], -1), num_experts, mask_N
            )
            for _, a in moe
        ]
    )
    probs_LxNxE = jax.nn.softmax(logits_LxNxE.astype(jnp.float32), axis=-1)
    return {
        "layers": tuple(i for i, _ in moe),
        "counts_LxE": jax.lax.stop_gradient(counts_LxE),
        "probs_LxE": jnp.einsum("lne,n->le", probs_LxNxE, mask_N),
        "tokens": jnp.sum(mask_N),
    }


def router_loss_from_stats(cfg: ModelConfig, stats):
    """The unscaled balancing loss of `router_aux_loss` from `router_stats`. Linear in
    probs_LxE, so a micro-batch's share is this function of (the whole batch's counts and
    tokens, its own probs_LxE) and the shares sum to the whole batch's loss."""
    counts_LxE, probs_LxE = stats["counts_LxE"], stats["probs_LxE"]
    num_layers, num_experts = counts_LxE.shape
    k = cfg.num_experts_per_tok
    if cfg.moe_global_lbl:  # per layer: f_i = counts_i * K / sum(counts), p_i per real token
        f_LxE = counts_LxE * k / jnp.maximum(jnp.sum(counts_LxE, -1, keepdims=True), 1.0)
        p_LxE = probs_LxE / jnp.maximum(stats["tokens"], 1.0)
        return jnp.mean(num_experts * jnp.sum(f_LxE * p_LxE, axis=-1))
    # HF: every (layer, token) row pooled, f_i = assignments / rows, p_i = mean probability.
    rows = jnp.maximum(num_layers * stats["tokens"], 1.0)
    f_E, p_E = jnp.sum(counts_LxE, 0) / rows, jnp.sum(probs_LxE, 0) / rows
    return num_experts * jnp.sum(f_E * p_E)


def router_metrics_from_stats(cfg: ModelConfig, stats):
    """`router_aux_loss`'s metrics from (a whole batch's) `router_stats`."""
    imbalance_L = moe_losses.expert_load_metrics(stats["counts_LxE"])["max_over_mean"]
    layers = stats["layers"]
    metrics = {f"moe/load_imbalance_layer{i}": imbalance_L[j] for j, i in enumerate(layers)}
    metrics["moe/load_imbalance"] = jnp.mean(imbalance_L)
    metrics["moe/lbl_loss"] = jax.lax.stop_gradient(router_loss_from_stats(cfg, stats))
    return metrics
