"""Pallas (Triton) forward kernel for span KL on GPU; the backward runs as XLA tiles (cuBLAS).

One program per token block: if the block holds no routed token it returns at once; otherwise
it walks the vocabulary in [block_t, block_v] tiles (each tile's logits accumulated over D in
chunks of `block_d`), folding them into the online log-sum-exp state of `tiles.py`. Edges in T,
D and V are handled with masked loads, so nothing is padded. Block sizes must be powers of two
>= 16 (Triton dot). Outputs of skipped blocks are left unwritten; the caller masks them by route.
This module imports Triton-specific Pallas lazily through `api.py`, so CPU imports never fail.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.span_kl import tiles

_INTERPRET = False


@contextlib.contextmanager
def force_interpret():
    """Test hook: trace `implementation="pallas_gpu"` in Pallas interpret mode (runs on CPU)."""
    global _INTERPRET
    previous, _INTERPRET = _INTERPRET, True
    try:
        yield
    finally:
        _INTERPRET = previous


def _matmul_tile(h_ref, w_ref, r0, v0, row_ok, col_ok, *, d, block_t, block_v, block_d):
    """[block_t, block_v] float32 logits h[r0:, :] @ W[:, v0:], accumulated over D chunks."""

    def body(k, acc):
        d0 = k * block_d
        d_ok = (d0 + jnp.arange(block_d)) < d
        h = pltr.load(
            h_ref.at[pl.ds(r0, block_t), pl.ds(d0, block_d)],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        w = pltr.load(
            w_ref.at[pl.ds(d0, block_d), pl.ds(v0, block_v)],
            mask=d_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        return acc + jnp.dot(h, w, preferred_element_type=jnp.float32)

    acc0 = jnp.zeros((block_t, block_v), jnp.float32)
    return lax.fori_loop(0, pl.cdiv(d, block_d), body, acc0)


def _fwd_kernel(
    hs_ref,
    tin_ref,
    w_ref,
    route_ref,
    kl_ref,
    lses_ref,
    lset_ref,
    *,
    num_tokens,
    d,
    num_vocab,
    block_t,
    block_v,
    block_d,
    teacher_is_logits,
):
    r0 = pl.program_id(0) * block_t
    row_ok = (r0 + jnp.arange(block_t)) < num_tokens
    route = pltr.load(route_ref.at[pl.ds(r0, block_t)], mask=row_ok, other=0)
    mm = functools.partial(_matmul_tile, d=d, block_t=block_t, block_v=block_v, block_d=block_d)

    @pl.when(jnp.max(jnp.where(route != 0, 1, 0)) > 0)
    def _():
        def vocab_step(j, state):
            v0 = j * block_v
            col_ok = (v0 + jnp.arange(block_v)) < num_vocab
            s = mm(hs_ref, w_ref, r0, v0, row_ok, col_ok)
            if teacher_is_logits:
                t = pltr.load(
                    tin_ref.at[pl.ds(r0, block_t), pl.ds(v0, block_v)],
                    mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0,
                ).astype(jnp.float32)
            else:
                t = mm(tin_ref, w_ref, r0, v0, row_ok, col_ok)
            return tiles.kl_update(state, s, t, col_ok[None, :])

        state0 = tiles.kl_init((block_t, 1))
        state = lax.fori_loop(0, pl.cdiv(num_vocab, block_v), vocab_step, state0)
        for ref, value in zip(
            (kl_ref, lses_ref, lset_ref), tiles.kl_finalize(state, route[:, None])
        ):
            pltr.store(ref.at[pl.ds(r0, block_t)], value[:, 0], mask=row_ok)


def kl_forward(h_TxD, w_DxV, teacher, route_Tx1, *, bt, bv, interpret=None):
    """(kl, lse_s, lse_t) [T, 1] float32; rows of skipped (route-0) blocks are unspecified."""
    (num_tokens, d), num_vocab = h_TxD.shape, w_DxV.shape[1]
    kind, tin = teacher
    block_d = min(64, max(16, pl.next_power_of_2(d)))
    kernel = functools.partial(
        _fwd_kernel,
        num_tokens=num_tokens,
        d=d,
        num_vocab=num_vocab,
        block_t=bt,
        block_v=bv,
        block_d=block_d,
        teacher_is_logits=kind == "logits",
    )
    interpret = _INTERPRET if interpret is None else interpret
    col = jax.ShapeDtypeStruct((num_tokens,), jnp.float32)
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens, bt),),
        out_shape=[col] * 3,
        compiler_params=None if interpret else pltr.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
    )(h_TxD, tin, w_DxV, route_Tx1[:, 0])
    return tuple(x[:, None] for x in outs)
