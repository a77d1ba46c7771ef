"""Chunked linear attention in XLA: a lax.scan over chunks carrying the [Dk, Dv] state.

Inside a chunk of C tokens the output is a masked [C, C] matmul plus the carried state's
contribution; across chunks only the float32 state is carried, so activation memory is
O(T * (C + D)) and never O(T^2). The backward is hand-written (used by the custom_vjp in
api.py for every implementation): it re-runs a state-only forward scan to get each chunk's
starting state, then runs a reverse scan carrying dS. Saving the per-chunk states instead would
cost T / C * Dk * Dv floats per head; recomputing them costs one small matmul per chunk.

Layout of every array here ("chunk-major"): q [N, B, H, C, Dk], v [N, B, H, C, Dv], the
in-chunk inclusive cumulative log-decay b [N, B, H, C] (float32), state [B, H, Dk, Dv].
"""

import jax
import jax.numpy as jnp

f32 = jnp.float32


def _masked_decay(b_BxHxC):
    """exp(b_i - b_j) for j <= i else 0, as [B, H, C, C]; the mask precedes exp (no inf*0)."""
    c = b_BxHxC.shape[-1]
    causal = jnp.tril(jnp.ones((c, c), bool))
    diff = b_BxHxC[..., :, None] - b_BxHxC[..., None, :]
    return jnp.exp(jnp.where(causal, diff, -jnp.inf))


def chunk_forward(state, q, k, v, b):
    """One chunk. state [B, H, Dk, Dv] f32; q, k [B, H, C, Dk]; v [B, H, C, Dv]; b [B, H, C].

    Returns (next_state [B, H, Dk, Dv] f32, o [B, H, C, Dv] f32).
    """
    q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)
    scores = jnp.einsum("bhid,bhjd->bhij", q, k) * _masked_decay(b)
    o = jnp.einsum("bhij,bhjv->bhiv", scores, v)
    o = o + jnp.einsum("bhid,bhdv->bhiv", q * jnp.exp(b)[..., None], state)
    b_last = b[..., -1:]
    k_to_end = k * jnp.exp(b_last - b)[..., None]
    state = jnp.exp(b_last)[..., None] * state + jnp.einsum("bhjd,bhjv->bhdv", k_to_end, v)
    return state, o


def forward(q, k, v, b, state):
    """Chunk-major forward. Returns (o [N, B, H, C, Dv] f32, final_state f32)."""

    def body(s, xs):
        return chunk_forward(s, *xs)

    state, o = jax.lax.scan(body, state.astype(f32), (q, k, v, b))
    return o, state


def chunk_start_states(k, v, b, state):
    """State entering each chunk, [N, B, H, Dk, Dv] (a state-only forward scan)."""

    def body(s, xs):
        kc, vc, bc = xs
        b_last = bc[..., -1:]
        k_to_end = kc.astype(f32) * jnp.exp(b_last - bc)[..., None]
        nxt = jnp.exp(b_last)[..., None] * s
        nxt = nxt + jnp.einsum("bhjd,bhjv->bhdv", k_to_end, vc.astype(f32))
        return nxt, s

    _, starts = jax.lax.scan(body, state.astype(f32), (k, v, b))
    return starts


def backward(q, k, v, b, initial_state, final_state, do, d_final_state):
    """Gradients of (o, final_state) w.r.t. (q, k, v, per-token log-decay, initial_state).

    The log-decay gradient uses the identity dL/dB_i = q_i . dq_i - k_i . dk_i for the global
    cumulative decay B (plus <dS_T, S_T> at the last position); dlog_g is its reverse cumsum.
    Returns (dq, dk, dv f32 chunk-major, dB [N, B, H, C] f32, d_initial_state f32).
    """
    starts = chunk_start_states(k, v, b, initial_state)

    def body(ds, xs):
        qc, kc, vc, bc, s0, doc = xs
        qc, kc, vc, doc = qc.astype(f32), kc.astype(f32), vc.astype(f32), doc.astype(f32)
        decay = _masked_decay(bc)
        eb = jnp.exp(bc)[..., None]
        to_end = jnp.exp(bc[..., -1:] - bc)[..., None]
        dp = jnp.einsum("bhiv,bhjv->bhij", doc, vc) * decay
        scores = jnp.einsum("bhid,bhjd->bhij", qc, kc) * decay
        dq = jnp.einsum("bhij,bhjd->bhid", dp, kc) + eb * jnp.einsum("bhiv,bhdv->bhid", doc, s0)
        dk = jnp.einsum("bhij,bhid->bhjd", dp, qc)
        dk = dk + to_end * jnp.einsum("bhjv,bhdv->bhjd", vc, ds)
        dv = jnp.einsum("bhij,bhiv->bhjv", scores, doc)
        dv = dv + jnp.einsum("bhjd,bhdv->bhjv", kc * to_end, ds)
        d_b = jnp.sum(qc * dq, -1) - jnp.sum(kc * dk, -1)
        ds_prev = jnp.exp(bc[..., -1])[..., None, None] * ds
        ds_prev = ds_prev + jnp.einsum("bhid,bhiv->bhdv", qc * eb, doc)
        return ds_prev, (dq, dk, dv, d_b)

    xs = (q, k, v, b, starts, do)
    d_init, (dq, dk, dv, d_b) = jax.lax.scan(body, d_final_state.astype(f32), xs, reverse=True)
    # Every log-decay term in S_T carries exp(B_T), so dL/dB_T gains <dS_T, S_T>.
    d_end = jnp.sum(d_final_state.astype(f32) * final_state, axis=(-2, -1))
    d_b = d_b.at[-1, ..., -1].add(d_end)
    return dq, dk, dv, d_b, d_init
