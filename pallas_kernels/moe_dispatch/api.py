"""`moe_ffn`: routed SwiGLU experts as sort -> three grouped matmuls -> unsort -> combine."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import _mesh
from pallas_kernels.moe_dispatch import routing
from pallas_kernels.moe_dispatch.gmm import gmm

KERNELS = ("pallas_tpu", "pallas_gpu", "interpret")  # run under shard_map on a mesh


class MoEStats(NamedTuple):
    """Per-call dispatch statistics (a pytree of int32 arrays).

    tokens_per_expert_E: assignments routed to each expert (before any capacity drop); feed it
        to the load-balancing losses / bias update in `jaxtrace.losses.moe`.
    kept_per_expert_E: assignments actually computed per expert.
    num_dropped: assignments dropped by the capacity limit (0 when dropless).
    """

    tokens_per_expert_E: jax.Array
    kept_per_expert_E: jax.Array
    num_dropped: jax.Array


def _check_shapes(x_TxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD):
    if x_TxD.ndim != 2:
        raise ValueError(f"x_TxD must be [T, D], got shape {x_TxD.shape}")
    if w_gate_ExDxF.ndim != 3 or w_gate_ExDxF.shape[1] != x_TxD.shape[1]:
        raise ValueError(
            f"w_gate_ExDxF must be [E, D={x_TxD.shape[1]}, F], got shape {w_gate_ExDxF.shape}"
        )
    num_experts, d, f = w_gate_ExDxF.shape
    if w_up_ExDxF.shape != (num_experts, d, f):
        raise ValueError(f"w_up_ExDxF must be {(num_experts, d, f)}, got {w_up_ExDxF.shape}")
    if w_down_ExFxD.shape != (num_experts, f, d):
        raise ValueError(f"w_down_ExFxD must be {(num_experts, f, d)}, got {w_down_ExFxD.shape}")


def resolve_routing(routing_in, num_tokens, num_experts, *, top_k=None, norm_topk_prob=True):
    """Router logits [T, E] or (topk_weights_TxK, topk_ids_TxK) -> (weights, ids)."""
    if isinstance(routing_in, tuple | list):
        if len(routing_in) != 2:
            raise ValueError(
                "routing must be router_logits_TxE or (topk_weights_TxK, topk_ids_TxK)"
            )
        topk_weights_TxK, topk_ids_TxK = routing_in
        if topk_weights_TxK.shape != topk_ids_TxK.shape or topk_ids_TxK.ndim != 2:
            raise ValueError(
                f"topk_weights_TxK {topk_weights_TxK.shape} and topk_ids_TxK "
                f"{topk_ids_TxK.shape} must both be [T, K]"
            )
        if not jnp.issubdtype(topk_ids_TxK.dtype, jnp.integer):
            raise ValueError(f"topk_ids_TxK must be integer, got {topk_ids_TxK.dtype}")
    else:
        if routing_in.shape != (num_tokens, num_experts):
            raise ValueError(
                f"router_logits_TxE must be {(num_tokens, num_experts)}, got {routing_in.shape}"
            )
        if top_k is None:
            raise ValueError("top_k is required when routing is given as router_logits_TxE")
        topk_weights_TxK, topk_ids_TxK, _ = routing.route_topk(
            routing_in, top_k, norm_topk_prob=norm_topk_prob
        )
    if topk_ids_TxK.shape[0] != num_tokens:
        raise ValueError(f"routing has {topk_ids_TxK.shape[0]} tokens, x_TxD has {num_tokens}")
    return topk_weights_TxK, topk_ids_TxK


def expert_ffn_sorted(x_MxD, group_sizes_E, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, **gmm_kw):
    """SwiGLU on expert-sorted rows: (silu(x Wg) * (x Wu)) Wd per group -> [M, D] float32.

    The hidden is cast to x's dtype before the down projection, as a bf16 HF model does.
    """
    f32 = jnp.float32
    gate_MxF = gmm(x_MxD, w_gate_ExDxF, group_sizes_E, preferred_element_type=f32, **gmm_kw)
    up_MxF = gmm(x_MxD, w_up_ExDxF, group_sizes_E, preferred_element_type=f32, **gmm_kw)
    hidden_MxF = (jax.nn.silu(gate_MxF) * up_MxF).astype(x_MxD.dtype)
    return gmm(hidden_MxF, w_down_ExFxD, group_sizes_E, preferred_element_type=f32, **gmm_kw)


def _moe_ffn_sharded(mesh, x, weights, ids, w_gate, w_up, w_down, **kw):
    """`moe_ffn` with a Pallas grouped matmul on a mesh (Mosaic / Triton kernels cannot be
    partitioned by XLA): tokens split over every mesh axis that divides them; with an `expert`
    axis the experts are split over it (`moe_ffn_expert_parallel`), else each device gathers
    every expert's weights, as FSDP gathers any weight, and dispatches its own tokens."""
    from pallas_kernels.moe_dispatch.expert_parallel import moe_ffn_expert_parallel

    ep = mesh.shape.get("expert", 1)
    tokens = _mesh.split_axes(mesh, x.shape[0])
    if ep > 1 and w_gate.shape[0] % ep == 0 and kw["capacity_factor"] is None:
        return moe_ffn_expert_parallel(
            x, weights, ids, w_gate, w_up, w_down, mesh=mesh, token_axes=tokens,
            implementation=kw["implementation"], tiling=kw["tiling"], check_vma=False,
        )  # fmt: skip
    tok = P(_mesh.spec_entry(tokens))

    def local(x, weights, ids, w_gate, w_up, w_down):
        y, stats = moe_ffn(x, (weights, ids), w_gate, w_up, w_down, **kw)
        total = lambda c: jax.lax.psum(c, tokens) if tokens else c
        return y, MoEStats(*(total(c) for c in stats))

    in_specs = (tok, tok, tok, P(), P(), P())
    stats_specs = MoEStats(P(), P(), P())
    fn = _mesh.shard_map(local, mesh, in_specs, (tok, stats_specs))
    return fn(x, weights, ids, w_gate, w_up, w_down)


def moe_ffn(
    x_TxD,
    routing_in,
    w_gate_ExDxF,
    w_up_ExDxF,
    w_down_ExFxD,
    *,
    top_k=None,
    norm_topk_prob=True,
    implementation=None,
    capacity_factor=None,
    tiling=None,
    valid_TxK=None,
):
    """Routed SwiGLU mixture of experts: y[t] = sum_k w[t,k] * FFN_{ids[t,k]}(x[t]).

    Args:
      x_TxD: tokens (flatten batch and sequence first).
      routing_in: router_logits_TxE (then `top_k` is required and routing is HF Qwen3-MoE's:
        float32 softmax, top-k, optional renormalisation), or (topk_weights_TxK, topk_ids_TxK).
      w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD: expert weights.
      implementation: `gmm` backend, one of `IMPLEMENTATIONS` (None: `xla`).
      capacity_factor: None is dropless; else each expert computes at most
        ceil(capacity_factor * T * K / E) rows, later tokens first to go.
      tiling: (tm, tk, tn) for the Pallas paths.
      valid_TxK: optional 0/1 mask; 0 skips an assignment (used by expert parallelism).
    Returns:
      (y_TxD in x's dtype, MoEStats). Differentiable in x, the weights and the routing weights.
    """
    _check_shapes(x_TxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
    num_tokens, num_experts = x_TxD.shape[0], w_gate_ExDxF.shape[0]
    topk_weights_TxK, topk_ids_TxK = resolve_routing(
        routing_in, num_tokens, num_experts, top_k=top_k, norm_topk_prob=norm_topk_prob
    )
    mesh = _mesh.context_mesh() if implementation in KERNELS else None
    if mesh is not None and valid_TxK is None:
        return _moe_ffn_sharded(
            mesh, x_TxD, topk_weights_TxK, topk_ids_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
            implementation=implementation, capacity_factor=capacity_factor, tiling=tiling,
        )  # fmt: skip
    capacity = routing.expert_capacity(
        num_tokens, topk_ids_TxK.shape[1], num_experts, capacity_factor
    )
    dispatch = routing.sort_tokens(
        topk_ids_TxK, num_experts, valid_TxK=valid_TxK, capacity=capacity
    )
    x_MxD = routing.permute(x_TxD, dispatch)
    y_MxD = expert_ffn_sorted(
        x_MxD,
        dispatch.group_sizes_E,
        w_gate_ExDxF,
        w_up_ExDxF,
        w_down_ExFxD,
        implementation=implementation,
        tiling=tiling,
    )
    y_TxD = routing.combine(
        routing.unsort(y_MxD, dispatch), topk_weights_TxK, dispatch, x_TxD.dtype
    )
    kept = jnp.sum(dispatch.group_sizes_E)
    stats = MoEStats(
        tokens_per_expert_E=dispatch.tokens_per_expert_E,
        kept_per_expert_E=dispatch.group_sizes_E,
        num_dropped=jnp.sum(dispatch.tokens_per_expert_E) - kept,
    )
    return y_TxD, stats
