"""Pallas TPU (Mosaic) forward kernel for chunked linear attention; also the `interpret` path.

Grid (B*H, N): one program per (sequence-head, chunk). The chunk axis is sequential
("arbitrary"), and the final-state output block has the same index for every chunk, so it stays
resident in VMEM and doubles as the carried [Dk, Dv] float32 state (the accumulator pattern);
it is written back to HBM once per sequence-head. Only the forward runs here: the backward is
the XLA reverse scan in chunked.py (wired by the custom_vjp in api.py).

Mosaic wants the last two block dims divisible by (8, 128) or equal to the array's: chunk
sizes that are multiples of 8 (rows) and head dims that are multiples of 128 (or the full
dim) tile best. The in-chunk cumulative log-decay is passed twice, as a column and as a row,
so the kernel needs no in-register transpose.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

f32 = jnp.float32
_TN = (((0,), (0,)), ((), ()))  # contract the leading dims: a^T @ b
_NT = (((1,), (1,)), ((), ()))  # contract the trailing dims: a @ b^T


def chunk_kernel(q_ref, k_ref, v_ref, bcol_ref, brow_ref, s0_ref, o_ref, s_ref):
    """One chunk: q, k [C, Dk]; v [C, Dv]; bcol [C, 1]; brow [1, C]; s0, s [Dk, Dv]."""

    @pl.when(pl.program_id(1) == 0)
    def _init():
        s_ref[...] = s0_ref[...]

    q, k, v = q_ref[...].astype(f32), k_ref[...].astype(f32), v_ref[...].astype(f32)
    b_col, b_row = bcol_ref[...], brow_ref[...]
    c = q.shape[0]
    causal = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0) >= jax.lax.broadcasted_iota(
        jnp.int32, (c, c), 1
    )
    # Mask the exponent first: exp of a positive difference above the diagonal may overflow.
    decay = jnp.where(causal, jnp.exp(jnp.where(causal, b_col - b_row, 0.0)), 0.0)
    scores = jax.lax.dot_general(q, k, _NT, preferred_element_type=f32) * decay
    state = s_ref[...]
    o = jnp.dot(scores, v, preferred_element_type=f32)
    o = o + jnp.dot(q * jnp.exp(b_col), state, preferred_element_type=f32)
    o_ref[...] = o.astype(o_ref.dtype)
    b_last = b_row[:, c - 1 :]
    k_to_end = k * jnp.exp(b_last - b_col)
    s_ref[...] = jnp.exp(b_last) * state + jax.lax.dot_general(
        k_to_end, v, _TN, preferred_element_type=f32
    )


@functools.partial(jax.jit, static_argnames=("chunk", "interpret"))
def forward(q, k, v, b, s0, *, chunk, interpret=False):
    """q, k [G, T, Dk]; v [G, T, Dv]; b [G, T] in-chunk cumsum; s0 [G, Dk, Dv]; T % chunk == 0.

    Returns (o [G, T, Dv] in q.dtype, final state [G, Dk, Dv] float32).
    """
    g, t, dk = q.shape
    dv = v.shape[-1]
    n = t // chunk
    b = b.astype(f32)
    seq = lambda d: pl.BlockSpec((None, chunk, d), lambda i, j: (i, j, 0))
    whole = pl.BlockSpec((None, dk, dv), lambda i, j: (i, 0, 0))
    kwargs = {}
    if not interpret:
        from jax.experimental.pallas import tpu as pltpu

        kwargs["compiler_params"] = pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary")
        )
    return pl.pallas_call(
        chunk_kernel,
        grid=(g, n),
        in_specs=[
            seq(dk),
            seq(dk),
            seq(dv),
            seq(1),
            pl.BlockSpec((None, None, 1, chunk), lambda i, j: (i, j, 0, 0)),
            whole,
        ],
        out_specs=[seq(dv), whole],
        out_shape=[
            jax.ShapeDtypeStruct((g, t, dv), q.dtype),
            jax.ShapeDtypeStruct((g, dk, dv), f32),
        ],
        interpret=interpret,
        **kwargs,
    )(q, k, v, b[..., None], b.reshape(g, n, 1, chunk), s0.astype(f32))
