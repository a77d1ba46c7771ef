"""LASP-2-style sequence parallelism for linear attention: shard T over a mesh axis.

Each shard runs the chunked op on its slice from a zero state, giving local outputs, its local
final state M_s [B, H, Dk, Dv] and its total log-decay G_s [B, H]. One all-gather of (M, G)
across the axis lets every shard prefix-combine the states of the shards before it,
    S_in(s) = sum_{r<s} exp(G_{r+1} + ... + G_{s-1}) M_r + exp(G_0 + ... + G_{s-1}) S_init,
and add the correction exp(B_i^local) q_i S_in(s) to its outputs. Communication is one
all-gather of P * Dk * Dv floats per head, independent of T. Gradients flow through shard_map
(the all-gather transposes to a reduce-scatter).
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.linear_attention import api, reference

f32 = jnp.float32


def linear_attention_sequence_parallel(
    q,
    k,
    v,
    log_g=None,
    *,
    mesh,
    axis_name,
    initial_state=None,
    chunk_size=api.DEFAULT_CHUNK,
    implementation=None,
):
    """`linear_attention` with T sharded over mesh axis `axis_name` (T % axis size == 0).

    Shapes as in `linear_attention`; the batch and head axes stay replicated inside this op
    (wrap it in an outer shard_map for data/tensor parallelism). Mesh axes of type Auto (with
    Explicit axes, reshard the inputs to P(None, axis_name) first). Returns (o [B, T, H, Dv],
    final_state [B, H, Dk, Dv] float32, replicated).
    """
    api.validate(q, k, v, log_g, initial_state, name="linear_attention_sequence_parallel")
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name {axis_name!r} is not a mesh axis of {dict(mesh.shape)}")
    n_shards = mesh.shape[axis_name]
    bsz, t, h, dk = q.shape
    if t % n_shards:
        raise ValueError(f"sequence length T={t} must divide evenly over {n_shards} shards")
    k, v = reference.repeat_kv_heads(k, h), reference.repeat_kv_heads(v, h)
    if log_g is None:
        log_g = jnp.zeros((bsz, t, h), f32)
    if initial_state is None:
        initial_state = jnp.zeros((bsz, h, dk, v.shape[-1]), f32)

    def local(q, k, v, log_g, s_init):
        o, m_s = api.linear_attention(
            q, k, v, log_g, chunk_size=chunk_size, implementation=implementation
        )
        cum_BxTxH = jnp.cumsum(log_g.astype(f32), axis=1)
        g_s = cum_BxTxH[:, -1]
        m_all = jax.lax.all_gather(m_s, axis_name)  # [P, B, H, Dk, Dv]
        g_all = jax.lax.all_gather(g_s, axis_name)  # [P, B, H]
        me = jax.lax.axis_index(axis_name)
        idx = jnp.arange(n_shards)
        # Decay from the end of shard r to the start of shard `me`: sum of G over r < u < me.
        g_before = jnp.cumsum(g_all, axis=0) - g_all  # exclusive prefix: G_0 + ... + G_{r-1}
        g_upto_me = jnp.sum(jnp.where((idx < me)[:, None, None], g_all, 0.0), axis=0)
        gap = g_upto_me[None] - g_before - g_all  # sum_{r<u<me} G_u, for r < me
        weight = jnp.where((idx < me)[:, None, None], jnp.exp(jnp.minimum(gap, 0.0)), 0.0)
        s_in = jnp.einsum("pbh,pbhdv->bhdv", weight, m_all)
        s_in = s_in + jnp.exp(g_upto_me)[..., None, None] * s_init
        o = o.astype(f32) + jnp.einsum(
            "bthd,bhdv->bthv", q.astype(f32) * jnp.exp(cum_BxTxH)[..., None], s_in
        )
        # Final state: everything up to and including the last shard.
        g_after = jnp.sum(g_all, axis=0) - g_before - g_all  # decay after shard r to the end
        s_final = jnp.einsum("pbh,pbhdv->bhdv", jnp.exp(g_after), m_all)
        s_final = s_final + jnp.exp(jnp.sum(g_all, axis=0))[..., None, None] * s_init
        return o.astype(q.dtype), s_final

    seq = P(None, axis_name)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(seq, seq, seq, seq, P()),
        out_specs=(seq, P()),
        check_vma=False,
    )(q, k, v, log_g, initial_state)
