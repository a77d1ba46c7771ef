"""Definitions of truth for linear and hybrid attention: plain jnp, O(T^2) or token-by-token.

Linear attention with per-head, per-token log-decay g_t <= 0 (state S_t is [Dk, Dv]):
    S_t = exp(g_t) S_{t-1} + k_t^T v_t,        o_t = q_t S_t,        S_{-1} = initial state.
Unrolled: o_i = sum_{j<=i} exp(B_i - B_j) (q_i . k_j) v_j + exp(B_i) q_i S_{-1}, B = cumsum(g).

Hybrid (Liger-style) attention, window w, per-head weights alpha, beta:
    o_i = alpha * softmax-attention over keys j with 0 <= i - j < w
        + beta  * linear attention over keys j with i - j >= w.
Everything is computed in float32; outputs are cast back to q's dtype.
"""

import jax
import jax.numpy as jnp

f32 = jnp.float32


def repeat_kv_heads(x_BxTxKxD, num_heads):
    """GQA: repeat K kv-heads to `num_heads` query heads ([B, T, K, D] -> [B, T, H, D])."""
    k = x_BxTxKxD.shape[2]
    return x_BxTxKxD if k == num_heads else jnp.repeat(x_BxTxKxD, num_heads // k, axis=2)


def _decay_matrix(log_g_BxTxH, t):
    """exp(B_i - B_j) masked to j <= i, as [B, H, T, T] (zero above the diagonal)."""
    b_BxHxT = jnp.cumsum(log_g_BxTxH.astype(f32), axis=1).transpose(0, 2, 1)
    causal = jnp.tril(jnp.ones((t, t), bool))
    diff = jnp.where(causal, b_BxHxT[..., :, None] - b_BxHxT[..., None, :], -jnp.inf)
    return jnp.exp(diff), b_BxHxT


def linear_attention_reference(q, k, v, log_g=None, initial_state=None):
    """Naive O(T^2) masked linear attention.

    Args: q [B, T, H, Dk]; k [B, T, K, Dk]; v [B, T, K, Dv] (K divides H); log_g [B, T, H] or
      None (no decay); initial_state [B, H, Dk, Dv] or None (zeros).
    Returns: (o [B, T, H, Dv] in q.dtype, final_state [B, H, Dk, Dv] float32).
    """
    b, t, h, dk = q.shape
    k, v = repeat_kv_heads(k, h), repeat_kv_heads(v, h)
    if log_g is None:
        log_g = jnp.zeros((b, t, h), f32)
    if initial_state is None:
        initial_state = jnp.zeros((b, h, dk, v.shape[-1]), f32)
    decay_BxHxTxT, b_BxHxT = _decay_matrix(log_g, t)
    qf, kf, vf = q.astype(f32), k.astype(f32), v.astype(f32)
    scores = jnp.einsum("bihd,bjhd->bhij", qf, kf) * decay_BxHxTxT
    o = jnp.einsum("bhij,bjhv->bihv", scores, vf)
    s0 = initial_state.astype(f32)
    o = o + jnp.einsum("bihd,bhdv->bihv", qf * jnp.exp(b_BxHxT).transpose(0, 2, 1)[..., None], s0)
    # Final state: every token decayed to the last position, plus the decayed initial state.
    w_BxHxT = jnp.exp(b_BxHxT[..., -1:] - b_BxHxT)
    state = jnp.einsum("bjhd,bhj,bjhv->bhdv", kf, w_BxHxT, vf)
    state = state + jnp.exp(b_BxHxT[..., -1])[..., None, None] * s0
    return o.astype(q.dtype), state


def linear_attention_step_reference(q_BxHxDk, k, v, log_g_BxH, state_BxHxDkxDv):
    """One recurrence step: S <- exp(g) S + k^T v; o = q S. k, v may have K <= H heads."""
    h = q_BxHxDk.shape[1]
    k = repeat_kv_heads(k[:, None], h)[:, 0].astype(f32)
    v = repeat_kv_heads(v[:, None], h)[:, 0].astype(f32)
    decay = jnp.ones(q_BxHxDk.shape[:2], f32) if log_g_BxH is None else jnp.exp(log_g_BxH)
    state = decay.astype(f32)[..., None, None] * state_BxHxDkxDv.astype(f32)
    state = state + k[..., :, None] * v[..., None, :]
    o = jnp.einsum("bhd,bhdv->bhv", q_BxHxDk.astype(f32), state)
    return o.astype(q_BxHxDk.dtype), state


def linear_attention_recurrent(q, k, v, log_g=None, initial_state=None):
    """Token-by-token recurrence (lax.scan over T); same contract as the naive reference."""
    b, t, h, dk = q.shape
    if log_g is None:
        log_g = jnp.zeros((b, t, h), f32)
    if initial_state is None:
        initial_state = jnp.zeros((b, h, dk, v.shape[-1]), f32)

    def step(state, xs):
        o, state = linear_attention_step_reference(*xs, state)
        return state, o

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_g))
    state, o_TxBxHxDv = jax.lax.scan(step, initial_state.astype(f32), xs)
    return jnp.moveaxis(o_TxBxHxDv, 0, 1), state


def hybrid_attention_reference(
    q, k, v, q_lin, k_lin, *, window, log_g=None, alpha=0.5, beta=0.5, scale=None
):
    """Naive O(T^2) hybrid attention (see module docstring).

    Args: q [B, T, H, D], k [B, T, K, D], v [B, T, K, Dv] for the softmax branch; q_lin
      [B, T, H, Dk], k_lin [B, T, K, Dk] (already feature-mapped) for the linear branch;
      window w >= 1; log_g [B, T, H] or None; alpha, beta scalars or [H]; scale defaults to
      1/sqrt(D).
    Returns: o [B, T, H, Dv] in q.dtype.
    """
    b, t, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    k, v, k_lin = (repeat_kv_heads(x, h).astype(f32) for x in (k, v, k_lin))
    if log_g is None:
        log_g = jnp.zeros((b, t, h), f32)
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    in_window = (i - j >= 0) & (i - j < window)
    logits = jnp.einsum("bihd,bjhd->bhij", q.astype(f32), k) * scale
    logits = jnp.where(in_window, logits, -jnp.inf)
    o_swa = jnp.einsum("bhij,bjhv->bihv", jax.nn.softmax(logits, axis=-1), v)
    decay_BxHxTxT, _ = _decay_matrix(log_g, t)
    far = jnp.where(i - j >= window, decay_BxHxTxT, 0.0)
    scores = jnp.einsum("bihd,bjhd->bhij", q_lin.astype(f32), k_lin) * far
    o_lin = jnp.einsum("bhij,bjhv->bihv", scores, v)
    alpha_H = jnp.broadcast_to(jnp.asarray(alpha, f32), (h,))[:, None]
    beta_H = jnp.broadcast_to(jnp.asarray(beta, f32), (h,))[:, None]
    return (alpha_H * o_swa + beta_H * o_lin).astype(q.dtype)
