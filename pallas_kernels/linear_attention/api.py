"""Public linear-attention op: `linear_attention` (prefill/training) and `linear_attention_step`.

Every implementation but "reference" shares one custom_vjp: the forward is the chosen backend,
the backward is the chunked XLA reverse scan (chunked.backward), whose residuals are just the
inputs, the initial and the final state (no per-chunk states, no [T, T] matrices).
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention import chunked, reference

f32 = jnp.float32
IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_gpu", "interpret", "reference")
DEFAULT_CHUNK = 64


def default_implementation():
    """The XLA chunked scan: the Pallas kernels are opt-in until validated on hardware."""
    return "xla"


def validate(q, k, v, log_g, initial_state, name="linear_attention"):
    """Raise ValueError naming the first bad argument (shapes as in `linear_attention`)."""
    if q.ndim != 4:
        raise ValueError(f"{name}: q must be [B, T, H, Dk], got shape {q.shape}")
    b, t, h, dk = q.shape
    if k.ndim != 4 or k.shape[:2] != (b, t) or k.shape[3] != dk:
        raise ValueError(f"{name}: k must be [B={b}, T={t}, K, Dk={dk}], got shape {k.shape}")
    if k.shape[2] == 0 or h % k.shape[2]:
        raise ValueError(f"{name}: k heads {k.shape[2]} must divide q heads {h} (GQA)")
    if v.ndim != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{name}: v must be [B, T, K, Dv] matching k {k.shape}, got {v.shape}")
    if log_g is not None and log_g.shape != (b, t, h):
        raise ValueError(f"{name}: log_g must be [B={b}, T={t}, H={h}], got shape {log_g.shape}")
    want = (b, h, dk, v.shape[3])
    if initial_state is not None and initial_state.shape != want:
        raise ValueError(f"{name}: initial_state must be {want}, got {initial_state.shape}")


def _forward_core(impl, chunk, q, k, v, log_g, s0):
    """Head-major padded inputs q, k [B, H, Tp, Dk], v [B, H, Tp, Dv], log_g [B, H, Tp]."""
    bsz, h, tp, dk = q.shape
    dv = v.shape[-1]
    n = tp // chunk
    b = jnp.cumsum(log_g.astype(f32).reshape(bsz, h, n, chunk), axis=-1)
    if impl == "xla":
        to_chunks = lambda x: jnp.moveaxis(x.reshape(*x.shape[:2], n, chunk, -1), 2, 0)
        o, state = chunked.forward(
            to_chunks(q), to_chunks(k), to_chunks(v), jnp.moveaxis(b, 2, 0), s0
        )
        return jnp.moveaxis(o, 0, 2).reshape(bsz, h, tp, dv).astype(q.dtype), state
    if impl in ("pallas_tpu", "interpret"):
        from pallas_kernels.linear_attention import kernel_tpu as kernel
    else:
        from pallas_kernels.linear_attention import kernel_gpu as kernel
    flat = lambda x: x.reshape(bsz * h, *x.shape[2:])
    o, state = kernel.forward(
        flat(q),
        flat(k),
        flat(v),
        b.reshape(bsz * h, tp),
        flat(s0),
        chunk=chunk,
        interpret=impl == "interpret",
    )
    return o.reshape(bsz, h, tp, dv), state.reshape(bsz, h, dk, dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _core(impl, chunk, q, k, v, log_g, s0):
    return _forward_core(impl, chunk, q, k, v, log_g, s0)


def _core_fwd(impl, chunk, q, k, v, log_g, s0):
    o, state = _forward_core(impl, chunk, q, k, v, log_g, s0)
    return (o, state), (q, k, v, log_g, s0, state)


def _core_bwd(impl, chunk, residuals, grads):
    del impl
    q, k, v, log_g, s0, state = residuals
    do, d_state = grads
    bsz, h, tp, _ = q.shape
    n = tp // chunk
    to_chunks = lambda x: jnp.moveaxis(x.reshape(*x.shape[:2], n, chunk, -1), 2, 0)
    b = jnp.cumsum(log_g.astype(f32).reshape(bsz, h, n, chunk), axis=-1)
    dq, dk, dv, d_b, d_s0 = chunked.backward(
        to_chunks(q), to_chunks(k), to_chunks(v), jnp.moveaxis(b, 2, 0), s0, state,
        to_chunks(do), d_state,
    )  # fmt: skip
    from_chunks = lambda x: jnp.moveaxis(x, 0, 2).reshape(bsz, h, tp, -1)
    # log_g_t enters every cumulative decay B_i with i >= t: reverse cumsum over the sequence.
    d_b = jnp.moveaxis(d_b, 0, 2).reshape(bsz, h, tp)
    d_log_g = jnp.flip(jnp.cumsum(jnp.flip(d_b, -1), -1), -1)
    return (
        from_chunks(dq).astype(q.dtype),
        from_chunks(dk).astype(k.dtype),
        from_chunks(dv).astype(v.dtype),
        d_log_g.astype(log_g.dtype),
        d_s0.astype(s0.dtype),
    )


_core.defvjp(_core_fwd, _core_bwd)


def linear_attention(
    q, k, v, log_g=None, initial_state=None, *, chunk_size=DEFAULT_CHUNK, implementation=None
):
    """Causal (gated) linear attention, chunked. Inputs are already feature-mapped.

    S_t = exp(log_g_t) S_{t-1} + k_t^T v_t;  o_t = q_t S_t  (per head; S is [Dk, Dv]).

    Args:
      q: [B, T, H, Dk].
      k: [B, T, K, Dk]; K divides H (GQA: kv head i serves query heads i*H/K ...).
      v: [B, T, K, Dv].
      log_g: [B, T, H] per-token log-decay (<= 0 for a stable recurrence), or None: no decay.
      initial_state: [B, H, Dk, Dv] or None (zeros), e.g. the state returned by a prefill.
      chunk_size: tokens per chunk (T is zero-padded to a multiple; padding is inert).
      implementation: one of IMPLEMENTATIONS; None picks `default_implementation()`.
    Returns:
      (o [B, T, H, Dv] in q.dtype, final_state [B, H, Dk, Dv] float32).
    """
    validate(q, k, v, log_g, initial_state)
    impl = default_implementation() if implementation is None else implementation
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if impl == "reference":
        return reference.linear_attention_reference(q, k, v, log_g, initial_state)
    bsz, t, h, dk = q.shape
    k, v = reference.repeat_kv_heads(k, h), reference.repeat_kv_heads(v, h)
    if log_g is None:
        log_g = jnp.zeros((bsz, t, h), f32)
    if initial_state is None:
        initial_state = jnp.zeros((bsz, h, dk, v.shape[-1]), f32)
    chunk = min(chunk_size, t)
    pad = -t % chunk
    # Zero-padding at the end is inert: k = 0 adds nothing to the state, log_g = 0 keeps it.
    head_major = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), [(0, 0), (0, 0), (0, pad), (0, 0)])
    log_g_p = jnp.pad(jnp.swapaxes(log_g, 1, 2), [(0, 0), (0, 0), (0, pad)])
    o, state = _core(
        impl, chunk, head_major(q), head_major(k), head_major(v), log_g_p, initial_state
    )
    return jnp.swapaxes(o[:, :, :t], 1, 2), state


def linear_attention_step(q_BxHxDk, k, v, log_g_BxH, state_BxHxDkxDv):
    """One decode step of the same recurrence: returns (o [B, H, Dv], new_state f32).

    Args: q [B, H, Dk]; k [B, K, Dk]; v [B, K, Dv]; log_g [B, H] or None; state [B, H, Dk, Dv].
    """
    if q_BxHxDk.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(
            f"linear_attention_step: q, k, v must be [B, heads, D], got "
            f"{q_BxHxDk.shape}, {k.shape}, {v.shape}"
        )
    validate(
        q_BxHxDk[:, None], k[:, None], v[:, None],
        None if log_g_BxH is None else log_g_BxH[:, None], state_BxHxDkxDv,
        name="linear_attention_step",
    )  # fmt: skip
    return reference.linear_attention_step_reference(q_BxHxDk, k, v, log_g_BxH, state_BxHxDkxDv)
