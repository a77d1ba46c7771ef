"""Expert parallelism: experts sharded over a mesh axis, dropless, exact.

Scheme (all-gather / local ragged dispatch / reduce-scatter), inside `shard_map`:
  1. all-gather the token shard, routing weights and ids over the expert axis, so each of the
     `ep` devices sees the tokens of its expert group;
  2. each device runs `moe_ffn` on its E/ep local experts only: assignments to other devices'
     experts are marked invalid and sort past the grouped matmul's rows (never computed);
  3. reduce-scatter (psum_scatter) the partial [T, D] outputs back to token shards.
Why not all-to-all: a dropless all-to-all needs ragged (data-dependent) buffer sizes, which
static-shape all-to-all can only emulate with a capacity (dropping tokens) or worst-case
padding. All-gather moves ep * T_local * D per device versus K * T_local * D for all-to-all,
so for ep <= top_k (8 for Qwen3-MoE) it moves no more data, keeps shapes static, and its
gradient is the exact transpose (reduce-scatter <-> all-gather) with no custom rules.
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.moe_dispatch.api import MoEStats, moe_ffn


def _explicit_axes(mesh):
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    return [a for a, t in zip(mesh.axis_names, getattr(mesh, "axis_types", ())) if t == explicit]


def _reshard(args, specs, mesh):
    """On meshes with Explicit axes, shard_map wants inputs already laid out as its in_specs."""
    if not _explicit_axes(mesh):
        return args
    return [jax.sharding.reshard(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]


def _to_varying(x, axis):
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, (axis,), to="varying")
    return jax.lax.pvary(x, (axis,))


def _shard_map(f, mesh, in_specs, out_specs, check_vma=True):
    if hasattr(jax, "shard_map"):
        return jax.shard_map(
            f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma
        )
    from jax.experimental.shard_map import shard_map

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def moe_ffn_expert_parallel(
    x_TxD,
    topk_weights_TxK,
    topk_ids_TxK,
    w_gate_ExDxF,
    w_up_ExDxF,
    w_down_ExFxD,
    *,
    mesh,
    expert_axis="expert",
    token_axes=None,
    implementation=None,
    tiling=None,
    check_vma=True,
):
    """`moe_ffn` with the E dim of the weights sharded over `mesh.shape[expert_axis]` devices.

    Args:
      x_TxD, topk_weights_TxK, topk_ids_TxK: tokens and their routing, T sharded over
        `token_axes` (default: `(expert_axis,)`; add data axes, e.g. ("data", "expert"), for
        DP x EP). T must divide by the product of those axis sizes.
      w_*: expert weights; E must divide by the expert-axis size.
      check_vma: False for Pallas implementations (a pallas_call's outputs carry no
        varying-axes type); autodiff then sums the cotangents of replicated inputs itself.
    Returns:
      (y_TxD sharded like x, MoEStats summed over the whole mesh).
    """
    token_axes = tuple(token_axes or (expert_axis,))
    if expert_axis not in mesh.shape:
        raise ValueError(f"expert_axis {expert_axis!r} not in mesh axes {tuple(mesh.shape)}")
    ep = mesh.shape[expert_axis]
    num_experts = w_gate_ExDxF.shape[0]
    if num_experts % ep:
        raise ValueError(f"num_experts={num_experts} must divide by mesh[{expert_axis!r}]={ep}")
    token_shards = 1
    for axis in token_axes:
        token_shards *= mesh.shape[axis]
    if x_TxD.shape[0] % token_shards:
        raise ValueError(
            f"x_TxD has T={x_TxD.shape[0]} tokens, not divisible by token_axes {token_axes} "
            f"({token_shards} shards)"
        )
    local_experts = num_experts // ep
    tokens_sharded_on_expert = expert_axis in token_axes

    def local(x, weights, ids, w_gate, w_up, w_down):
        if not tokens_sharded_on_expert and check_vma:
            # Tokens replicated over the expert axis: type them as varying before the dispatch
            # so autodiff sums the per-expert-group input gradients at this one cast (leaving it
            # implicit gave wrong x gradients through the gather on jax 0.10).
            x, weights = (_to_varying(a, expert_axis) for a in (x, weights))
        if tokens_sharded_on_expert:
            x, weights, ids = (
                jax.lax.all_gather(a, expert_axis, tiled=True) for a in (x, weights, ids)
            )
        first_expert = jax.lax.axis_index(expert_axis) * local_experts
        local_ids = ids - first_expert
        valid = (local_ids >= 0) & (local_ids < local_experts)
        y, stats = moe_ffn(
            x,
            (weights, jnp.where(valid, local_ids, 0)),
            w_gate,
            w_up,
            w_down,
            implementation=implementation,
            tiling=tiling,
            valid_TxK=valid,
        )
        if tokens_sharded_on_expert:
            y = jax.lax.psum_scatter(y.astype(jnp.float32), expert_axis, tiled=True)
        else:
            y = jax.lax.psum(y.astype(jnp.float32), expert_axis)
        # Each device counted its own experts over its token group: place them in a global [E]
        # and sum over the expert axis (psum, so the result is provably replicated), then add
        # the other token groups (data axes). Axes the tokens are replicated over add nothing.
        sum_axes = (expert_axis,) + tuple(a for a in token_axes if a != expert_axis)
        counts = [
            jax.lax.psum(
                jax.lax.dynamic_update_slice(jnp.zeros(num_experts, c.dtype), c, (first_expert,)),
                sum_axes,
            )
            for c in (stats.tokens_per_expert_E, stats.kept_per_expert_E)
        ]
        return y.astype(x.dtype), counts[0], counts[1]

    tokens = P(token_axes)
    experts = P(expert_axis)
    in_specs = (tokens, tokens, tokens, experts, experts, experts)
    args = (x_TxD, topk_weights_TxK, topk_ids_TxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
    y_TxD, tokens_per_expert_E, kept_per_expert_E = _shard_map(
        local, mesh, in_specs=in_specs, out_specs=(tokens, P(), P()), check_vma=check_vma
    )(*_reshard(args, in_specs, mesh))
    return y_TxD, MoEStats(tokens_per_expert_E, kept_per_expert_E, jnp.zeros((), jnp.int32))
