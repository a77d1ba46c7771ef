"""Pallas GPU (Triton) forward kernel for chunked linear attention.

Grid (B*H,): one program per sequence-head walks its chunks in a fori_loop, keeping the
[Dk, Dv] float32 state in registers, so nothing but q, k, v, o and the final state touches HBM.
Triton rather than Mosaic GPU: the op is a loop of small [C, C] / [C, D] matmuls with a
register-resident carry, which Triton expresses directly, whereas Mosaic GPU needs explicit
WGMMA layouts and shared-memory pipelining for the same thing. Triton needs power-of-two
chunk and head dims (>= 16 for tl.dot). The backward is the XLA reverse scan in chunked.py.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

f32 = jnp.float32


def sequence_kernel(q_ref, k_ref, v_ref, b_ref, s0_ref, o_ref, s_ref, *, chunk):
    """One sequence-head: q, k [T, Dk]; v, o [T, Dv]; b [T] in-chunk cumsum; s0, s [Dk, Dv]."""
    n = q_ref.shape[0] // chunk
    rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    causal = rows >= jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)

    def body(c, state):
        idx = pl.ds(c * chunk, chunk)
        q = q_ref[idx, :].astype(f32)
        k = k_ref[idx, :].astype(f32)
        v = v_ref[idx, :].astype(f32)
        b = b_ref[idx]
        decay = jnp.where(causal, jnp.exp(jnp.where(causal, b[:, None] - b[None, :], 0.0)), 0.0)
        scores = jnp.dot(q, k.T, preferred_element_type=f32) * decay
        o = jnp.dot(scores, v, preferred_element_type=f32)
        o = o + jnp.dot(q * jnp.exp(b)[:, None], state, preferred_element_type=f32)
        o_ref[idx, :] = o.astype(o_ref.dtype)
        b_last = jnp.max(jnp.where(jnp.arange(chunk) == chunk - 1, b, -jnp.inf))
        k_to_end = k * jnp.exp(b_last - b)[:, None]
        return jnp.exp(b_last) * state + jnp.dot(k_to_end.T, v, preferred_element_type=f32)

    s_ref[...] = jax.lax.fori_loop(0, n, body, s0_ref[...])


@functools.partial(jax.jit, static_argnames=("chunk", "interpret"))
def forward(q, k, v, b, s0, *, chunk, interpret=False):
    """Same contract as kernel_tpu.forward; T % chunk == 0."""
    g, t, dk = q.shape
    dv = v.shape[-1]
    kwargs = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=4, num_stages=1)
    per_seq = lambda *shape: pl.BlockSpec((None, *shape), lambda i: (i,) + (0,) * len(shape))
    return pl.pallas_call(
        functools.partial(sequence_kernel, chunk=chunk),
        grid=(g,),
        in_specs=[per_seq(t, dk), per_seq(t, dk), per_seq(t, dv), per_seq(t), per_seq(dk, dv)],
        out_specs=[per_seq(t, dv), per_seq(dk, dv)],
        out_shape=[
            jax.ShapeDtypeStruct((g, t, dv), q.dtype),
            jax.ShapeDtypeStruct((g, dk, dv), f32),
        ],
        interpret=interpret,
        **kwargs,
    )(q, k, v, b.astype(f32), s0.astype(f32))
