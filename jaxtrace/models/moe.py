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
    moe = [(i, a) for i, a in enumerate(aux_layers) if a is not None]
    if not moe:
        return jnp.float32(0.0), {}
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
    k = cfg.num_experts_per_tok
    if cfg.moe_global_lbl:
        per_layer = jax.vmap(
            lambda logits, counts: moe_losses.global_load_balancing_loss(
                logits, counts, k, mask_T=mask_N
            )
        )(logits_LxNxE, counts_LxE)
        loss = jnp.mean(per_layer)
    else:
        loss = moe_losses.load_balancing_loss(logits_LxNxE, k, mask_T=mask_N)
    imbalance_L = moe_losses.expert_load_metrics(counts_LxE)["max_over_mean"]
    metrics = {f"moe/load_imbalance_layer{i}": imbalance_L[j] for j, (i, _) in enumerate(moe)}
    metrics["moe/load_imbalance"] = jnp.mean(imbalance_L)
    metrics["moe/lbl_loss"] = loss
    return loss, metrics
