"""Hybrid (Liger-style) attention: sliding-window softmax + linear attention on the rest.

    o_i = alpha_h * softmax-attention(q_i; keys j with 0 <= i - j < w)
        + beta_h  * sum_{j <= i - w} exp(B_i - B_j) (q_lin_i . k_lin_j) v_j

The linear half is the chunked linear-attention op applied to keys and values shifted right by
w tokens, each shifted key pre-scaled by the decay over the w tokens it skipped
(exp(B_t - B_{t-w}) <= 1, so nothing overflows). Its final state is exactly the decode state of
the tokens that have left the window, so prefill hands decoding a constant-size state: a ring
buffer of the last w tokens plus one [Dk, Dv] state per head.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import _mesh
from pallas_kernels.linear_attention import api, reference, sliding_window

f32 = jnp.float32
KERNELS = ("pallas_tpu", "pallas_gpu", "interpret")  # run under shard_map on a mesh
DEFAULT_BLOCK = 64


class HybridState(NamedTuple):
    """Constant-size decode state. Slot s of the ring holds the latest position p = s mod w.

    k_win [B, w, K, D], v_win [B, w, K, Dv], k_lin_win [B, w, K, Dk]: the window's tokens;
    age_win [B, w, H]: log-decay accumulated since each slot's token arrived;
    linear_state [B, H, Dk, Dv] f32: tokens at distance >= w, decayed to the last position;
    length [B] int32: tokens seen so far.
    """

    k_win: jax.Array
    v_win: jax.Array
    k_lin_win: jax.Array
    age_win: jax.Array
    linear_state: jax.Array
    length: jax.Array


def _mix_weights(alpha, beta, h):
    as_h = lambda x, name: _per_head(x, h, name)
    return as_h(alpha, "alpha"), as_h(beta, "beta")


def _per_head(x, h, name):
    x = jnp.asarray(x, f32)
    if x.ndim > 1 or (x.ndim == 1 and x.shape[0] != h):
        raise ValueError(f"{name} must be a scalar or [H={h}], got shape {x.shape}")
    return jnp.broadcast_to(x, (h,))


def _validate(q, k, v, q_lin, k_lin, log_g, window):
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    api.validate(q, k, v, log_g, None, name="hybrid_attention")
    api.validate(q_lin, k_lin, v, log_g, None, name="hybrid_attention (linear branch)")


def _far_linear(q_lin, k_lin, v, log_g, window, chunk_size, implementation):
    """Linear attention over keys at distance >= window. Returns (o [B,T,H,Dv], state)."""
    bsz, t, h, _ = q_lin.shape
    k_lin, v = reference.repeat_kv_heads(k_lin, h), reference.repeat_kv_heads(v, h)
    shift = lambda x: jnp.pad(x, [(0, 0), (window, 0)] + [(0, 0)] * (x.ndim - 2))[:, :t]
    if log_g is None:
        k_far = shift(k_lin)
    else:
        cum_BxTxH = jnp.cumsum(log_g.astype(f32), axis=1)
        skipped = cum_BxTxH - shift(cum_BxTxH)  # B_t - B_{t-w} (t >= w, where k_far != 0)
        k_far = (shift(k_lin).astype(f32) * jnp.exp(skipped)[..., None]).astype(k_lin.dtype)
    impl = "xla" if implementation == "reference" else implementation
    return api.linear_attention(
        q_lin, k_far, shift(v), log_g, chunk_size=chunk_size, implementation=impl
    )


def _hybrid(q, k, v, q_lin, k_lin, log_g, window, alpha, beta, scale, chunk_size, block_size, impl):
    bsz, t, h, d = q.shape
    q_lin = q if q_lin is None else q_lin
    k_lin = k if k_lin is None else k_lin
    _validate(q, k, v, q_lin, k_lin, log_g, window)
    impl = api.default_implementation() if impl is None else impl
    if impl not in api.IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {api.IMPLEMENTATIONS}, got {impl!r}")
    scale = d**-0.5 if scale is None else float(scale)
    alpha_H, beta_H = _mix_weights(alpha, beta, h)
    o_lin, state = _far_linear(q_lin, k_lin, v, log_g, window, chunk_size, impl)
    if impl == "reference":
        o = reference.hybrid_attention_reference(
            q, k, v, q_lin, k_lin, window=window, log_g=log_g, alpha=alpha_H, beta=beta_H,
            scale=scale,
        )  # fmt: skip
        return o, state
    block = min(block_size, t)
    pad = -t % block
    head_major = lambda x: jnp.pad(
        jnp.swapaxes(reference.repeat_kv_heads(x, h), 1, 2), [(0, 0), (0, 0), (0, pad), (0, 0)]
    )
    args = (head_major(q), head_major(k), head_major(v))
    if impl == "xla":
        o_swa = sliding_window.window_attention_xla(*args, window=window, scale=scale, block=block)
    else:
        o_swa = sliding_window.window_attention_pallas(impl, window, scale, block, *args)
    o_swa = jnp.swapaxes(o_swa[:, :, :t], 1, 2)
    o = alpha_H[:, None] * o_swa + beta_H[:, None] * o_lin.astype(f32)
    return o.astype(q.dtype), state


def hybrid_attention(
    q, k, v, q_lin=None, k_lin=None, log_g=None, *, window, alpha=0.5, beta=0.5, scale=None,
    chunk_size=api.DEFAULT_CHUNK, block_size=DEFAULT_BLOCK, implementation=None,
):  # fmt: skip
    """Sliding-window softmax + linear attention outside the window, mixed per head.

    Args:
      q [B, T, H, D], k [B, T, K, D], v [B, T, K, Dv]: softmax branch (K divides H).
      q_lin [B, T, H, Dk], k_lin [B, T, K, Dk]: linear branch, already feature-mapped
        (e.g. `feature_maps.softmax_dim(q)`); None means q / k themselves.
      log_g [B, T, H] log-decay (<= 0) for the linear branch, or None.
      window: w >= 1; the softmax branch sees keys at distance 0 .. w-1 (w keys incl. self).
      alpha, beta: mixing weights, scalars or [H]. scale: softmax scale, default 1/sqrt(D).
      chunk_size: linear-attention chunk; block_size: query block of the window branch.
      implementation: as in `linear_attention` ("reference" is the naive O(T^2) one).
    Returns: o [B, T, H, Dv] in q.dtype.
    """

    def local(q, k, v, q_lin, k_lin, log_g, alpha, beta):
        return _hybrid(q, k, v, q_lin, k_lin, log_g, window, alpha, beta, scale, chunk_size,
                       block_size, implementation)[0]  # fmt: skip

    args = (q, k, v, q_lin, k_lin, log_g, jnp.asarray(alpha, f32), jnp.asarray(beta, f32))
    mesh = _mesh.context_mesh() if implementation in KERNELS else None
    if mesh is None:
        return local(*args)
    return _batch_sharded(local, mesh, args, num_mixing=2)


def _batch_sharded(local, mesh, args, num_mixing):
    """`local` on each device's rows (B split over every mesh axis that divides it; the last
    `num_mixing` args are per-head mixing weights, replicated): Mosaic / Triton kernels cannot be
    partitioned by XLA, so on a mesh they run under shard_map."""
    rows = _mesh.split_axes(mesh, args[0].shape[0])
    entry = _mesh.spec_entry(rows)
    spec = lambda x: None if x is None else P(entry, *([None] * (x.ndim - 1)))
    split = len(args) - num_mixing
    in_specs = tuple(spec(x) for x in args[:split]) + (P(),) * num_mixing
    return _mesh.shard_map_some(local, mesh, args, in_specs, spec(args[0]))


def hybrid_attention_prefill(
    q, k, v, q_lin=None, k_lin=None, log_g=None, *, window, alpha=0.5, beta=0.5, scale=None,
    chunk_size=api.DEFAULT_CHUNK, block_size=DEFAULT_BLOCK, implementation=None,
):  # fmt: skip
    """`hybrid_attention` that also returns the HybridState for `hybrid_attention_step`."""
    o, state = _hybrid(q, k, v, q_lin, k_lin, log_g, window, alpha, beta, scale, chunk_size,
                       block_size, implementation)  # fmt: skip
    k_lin = k if k_lin is None else k_lin
    bsz, t, h, _ = q.shape
    # Slot s holds the latest position p < T with p = s (mod w); p < 0 means still empty.
    pos_W = t - 1 - jnp.mod(t - 1 - jnp.arange(window), window)
    filled_W = pos_W >= 0
    take = lambda x: jnp.where(
        filled_W[None, :, None, None], jnp.take(x, jnp.maximum(pos_W, 0), axis=1), 0
    ).astype(x.dtype)
    if log_g is None:
        age = jnp.zeros((bsz, window, h), f32)
    else:
        cum_BxTxH = jnp.cumsum(log_g.astype(f32), axis=1)
        age = cum_BxTxH[:, -1:] - jnp.take(cum_BxTxH, jnp.maximum(pos_W, 0), axis=1)
        age = jnp.where(filled_W[None, :, None], age, 0.0)
    length = jnp.full((bsz,), t, jnp.int32)
    return o, HybridState(take(k), take(v), take(k_lin), age, state, length)


def init_hybrid_state(batch, window, num_heads, kv_heads, head_dim, lin_dim, v_dim, dtype=f32):
    """An empty HybridState (decode from scratch)."""
    zeros = lambda d: jnp.zeros((batch, window, kv_heads, d), dtype)
    return HybridState(
        zeros(head_dim), zeros(v_dim), zeros(lin_dim), jnp.zeros((batch, window, num_heads), f32),
        jnp.zeros((batch, num_heads, lin_dim, v_dim), f32), jnp.zeros((batch,), jnp.int32),
    )  # fmt: skip


def hybrid_attention_step(q, k, v, q_lin, k_lin, log_g, state, *, alpha=0.5, beta=0.5, scale=None):
    """One decode token. q [B, H, D], k [B, K, D], v [B, K, Dv], q_lin [B, H, Dk], k_lin
    [B, K, Dk] (None: q / k), log_g [B, H] or None; state: HybridState. Returns (o [B, H, Dv]
    in q.dtype, new HybridState). Memory is constant in the sequence length."""
    q_lin = q if q_lin is None else q_lin
    k_lin = k if k_lin is None else k_lin
    bsz, window = state.k_win.shape[:2]
    h, d = q.shape[1], q.shape[2]
    if q.ndim != 3 or k.shape != (bsz, *state.k_win.shape[2:]):
        raise ValueError(f"hybrid_attention_step: q {q.shape} / k {k.shape} do not fit the state")
    scale = d**-0.5 if scale is None else float(scale)
    alpha_H, beta_H = _mix_weights(alpha, beta, h)
    g_BxH = jnp.zeros((bsz, h), f32) if log_g is None else log_g.astype(f32)
    slot_BxW = jnp.arange(window)[None] == (state.length % window)[:, None]
    age = state.age_win + g_BxH[:, None]
    # The slot about to be overwritten holds position length - w, which now reaches distance w:
    # it leaves the window and joins the linear state, decayed by everything since it arrived.
    pick = lambda x: jnp.sum(jnp.where(slot_BxW[..., None, None], x.astype(f32), 0.0), axis=1)
    k_out = reference.repeat_kv_heads(pick(state.k_lin_win)[:, None], h)[:, 0]
    v_out = reference.repeat_kv_heads(pick(state.v_win)[:, None], h)[:, 0]
    age_out = jnp.sum(jnp.where(slot_BxW[..., None], age, 0.0), axis=1)
    evict = (state.length >= window)[:, None] * jnp.exp(age_out)
    lin = jnp.exp(g_BxH)[..., None, None] * state.linear_state
    lin = lin + evict[..., None, None] * k_out[..., :, None] * v_out[..., None, :]
    write = lambda buf, x: jnp.where(slot_BxW[..., None, None], x[:, None].astype(buf.dtype), buf)
    new = HybridState(
        write(state.k_win, k), write(state.v_win, v), write(state.k_lin_win, k_lin),
        jnp.where(slot_BxW[..., None], 0.0, age), lin, state.length + 1,
    )  # fmt: skip
    filled_BxW = jnp.arange(window)[None] < jnp.minimum(new.length, window)[:, None]
    k_win = reference.repeat_kv_heads(new.k_win, h).astype(f32)
    v_win = reference.repeat_kv_heads(new.v_win, h).astype(f32)
    logits = jnp.einsum("bhd,bwhd->bhw", q.astype(f32), k_win) * scale
    probs = jax.nn.softmax(jnp.where(filled_BxW[:, None], logits, -jnp.inf), axis=-1)
    o_swa = jnp.einsum("bhw,bwhv->bhv", probs, v_win)
    o_lin = jnp.einsum("bhd,bhdv->bhv", q_lin.astype(f32), lin)
    o = alpha_H[:, None] * o_swa + beta_H[:, None] * o_lin
    return o.astype(q.dtype), new
