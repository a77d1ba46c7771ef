"""Pallas (Mosaic TPU) kernels for span KL; with interpret=True they run anywhere (CPU tests).

Three kernels, each over a (token block, vocabulary block) grid with the reduction axis last:
  forward: online log-sum-exp of student and teacher logits -> kl, lse_s, lse_t   grid (nt, nv)
  dh:      dh += dlogits @ W_blk^T, accumulated over vocabulary blocks           grid (nt, nv)
  dW:      dW_blk += h^T @ dlogits, accumulated over token blocks                grid (nv, nt)
Token blocks come from a scalar-prefetched list of *active* blocks (holding a routed token):
steps past n_active do no work, and their index maps repeat the last block so no DMA is issued.
Outputs of skipped blocks are left unwritten; the caller masks them by route. T must be a
multiple of block_t (the caller pads tokens, which is cheap); V need not be a multiple of
block_v: edge columns are masked in-kernel, edge W columns zeroed before they meet dlogits.
Full D sits in each block; `choose_blocks` picks the blocks from the target chip's VMEM.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _mesh, _precision
from pallas_kernels.span_kl import tiles

_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b


# Token / vocabulary blocks in order of preference; the first whose working set fits the
# chip's VMEM is used (`choose_blocks`). (256, 512) is the measured CPU-interpret default and fits
# every current chip at D <= 1024; v4 (16 MiB of VMEM) needs smaller tiles at Qwen3 widths.
BLOCK_CANDIDATES = (
    (256, 512), (256, 256), (128, 512), (128, 256), (128, 128), (64, 256), (64, 128), (32, 128),
    (16, 128),
)  # fmt: skip
_ROW_BYTES = 128 * 4  # a [bt, 1] float32 column occupies a full 128-lane row per token in VMEM


def vmem_need(block_t, block_v, d, itemsize, teacher_is_logits=False):
    """Bytes of VMEM the largest of the three kernels holds at these blocks (an upper bound)."""
    teacher = block_t * block_v * itemsize if teacher_is_logits else block_t * d * itemsize
    inputs = 2 * (block_t * d * itemsize + teacher + d * block_v * itemsize)  # double-buffered
    rows = (2 * 8 + 6) * block_t * _ROW_BYTES  # 5 in + 3 out rows (x2 buffers), 6 state columns
    dh = 3 * block_t * d * 4  # output (x2) + float32 accumulator
    dw = 2 * d * block_v * itemsize + d * block_v * 4
    work = 6 * block_t * block_v * 4  # float32 logits, exps and dlogits tiles
    return inputs + rows + max(dh, dw) + work


def choose_blocks(d, itemsize, vmem_capacity, teacher_is_logits=False, fraction=0.75):
    """(block_t, block_v): the first of BLOCK_CANDIDATES that fits `fraction` of the VMEM."""
    for bt, bv in BLOCK_CANDIDATES:
        if vmem_need(bt, bv, d, itemsize, teacher_is_logits) <= fraction * vmem_capacity:
            return bt, bv
    need = vmem_need(*BLOCK_CANDIDATES[-1], d, itemsize, teacher_is_logits)
    raise ValueError(
        f"span_kl: hidden size D={d} does not fit {vmem_capacity / 2**20:.0f} MiB of VMEM even "
        f"at the smallest blocks {BLOCK_CANDIDATES[-1]} ({need / 2**20:.1f} MiB)"
    )


def _compiler_params(block_t, block_v, d, itemsize, teacher_is_logits=False):
    # Ask for what the blocks need plus slack, never more than the chip has.
    capacity = _mesh.vmem_bytes()
    need = vmem_need(block_t, block_v, d, itemsize, teacher_is_logits)
    vmem = int(min(max(1.5 * need, 16 << 20), 0.9 * capacity))
    params_cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    return params_cls(dimension_semantics=("arbitrary", "arbitrary"), vmem_limit_bytes=vmem)


def _valid_cols(j, block_v, num_vocab):
    return (j * block_v + lax.broadcasted_iota(jnp.int32, (1, block_v), 1)) < num_vocab


def _logits(hs_ref, tin_ref, w_ref, teacher_is_logits):
    w = w_ref[...]
    h = hs_ref[...]
    s = jnp.dot(h, w, preferred_element_type=jnp.float32, precision=_precision.mxu(h, w))
    if teacher_is_logits:
        t = tin_ref[...].astype(jnp.float32)
    else:
        tin = tin_ref[...]
        t = jnp.dot(tin, w, preferred_element_type=jnp.float32, precision=_precision.mxu(tin, w))
    return w, s, t


def _fwd_kernel(
    blocks_ref,
    nact_ref,
    hs_ref,
    tin_ref,
    w_ref,
    route_ref,
    kl_ref,
    lses_ref,
    lset_ref,
    *state_refs,
    num_vocab,
    block_v,
    teacher_is_logits,
):
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(i < nact_ref[0])
    def _():
        @pl.when(j == 0)
        def _():
            for ref, init in zip(state_refs, tiles.kl_init(state_refs[0].shape)):
                ref[...] = init

        _, s, t = _logits(hs_ref, tin_ref, w_ref, teacher_is_logits)
        valid = _valid_cols(j, block_v, num_vocab)
        state = tiles.kl_update(tuple(r[...] for r in state_refs), s, t, valid)
        for ref, value in zip(state_refs, state):
            ref[...] = value

        @pl.when(j == pl.num_programs(1) - 1)
        def _():
            kl, lse_s, lse_t = tiles.kl_finalize(state, route_ref[...])
            kl_ref[...], lses_ref[...], lset_ref[...] = kl, lse_s, lse_t


def _dlogits(s, t, rows, valid):
    route, lse_s, lse_t, kl, g = (r[...] for r in rows)
    return tiles.kl_dlogits(s, t, route, lse_s, lse_t, kl, g, valid)


def _dh_kernel(
    blocks_ref, nact_ref, hs_ref, tin_ref, w_ref, *refs, num_vocab, block_v, teacher_is_logits
):
    rows, dh_ref, acc_ref = refs[:5], refs[5], refs[6]
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(i < nact_ref[0])
    def _():
        @pl.when(j == 0)
        def _():
            acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        w, s, t = _logits(hs_ref, tin_ref, w_ref, teacher_is_logits)
        valid = _valid_cols(j, block_v, num_vocab)
        ds = _dlogits(s, t, rows, valid).astype(w.dtype)
        w = jnp.where(valid, w, jnp.zeros_like(w))  # edge columns of W may hold garbage
        acc_ref[...] += lax.dot_general(
            ds, w, _NT, preferred_element_type=jnp.float32, precision=_precision.mxu(ds, w)
        )

        @pl.when(j == pl.num_programs(1) - 1)
        def _():
            dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _dw_kernel(
    blocks_ref, nact_ref, hs_ref, tin_ref, w_ref, *refs, num_vocab, block_v, teacher_is_logits
):
    rows, dw_ref, acc_ref = refs[:5], refs[5], refs[6]
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(i < nact_ref[0])
    def _():
        _, s, t = _logits(hs_ref, tin_ref, w_ref, teacher_is_logits)
        h = hs_ref[...]
        ds = _dlogits(s, t, rows, _valid_cols(j, block_v, num_vocab)).astype(h.dtype)
        acc_ref[...] += lax.dot_general(
            h, ds, _TN, preferred_element_type=jnp.float32, precision=_precision.mxu(h, ds)
        )

    @pl.when(i == pl.num_programs(1) - 1)
    def _():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


def _specs(d, block_t, block_v, num_v_blocks, teacher_is_logits, *, token_axis, n_rows):
    """BlockSpecs for (h_s, teacher, W, *rows) with token block = blocks[grid[token_axis]]."""

    def ij(grid_i, grid_j):
        return (grid_i, grid_j) if token_axis == 0 else (grid_j, grid_i)

    def tok(*g):
        i, j = ij(*g[:2])
        blocks, nact = g[2], g[3]
        return blocks[i], j, i < nact[0]

    def h_map(*g):
        return (tok(*g)[0], 0)

    def w_map(*g):
        _, j, active = tok(*g)
        # Skipped token-outer steps keep the last W block resident instead of streaming W.
        return (0, jnp.where(active, j, num_v_blocks - 1) if token_axis == 0 else j)

    def tl_map(*g):
        blk, j, active = tok(*g)
        return (blk, jnp.where(active, j, num_v_blocks - 1) if token_axis == 0 else j)

    row = pl.BlockSpec((block_t, 1), h_map)
    teacher = (
        pl.BlockSpec((block_t, block_v), tl_map)
        if teacher_is_logits
        else pl.BlockSpec((block_t, d), h_map)
    )
    in_specs = [pl.BlockSpec((block_t, d), h_map), teacher, pl.BlockSpec((d, block_v), w_map)]
    return in_specs + [row] * n_rows, row, h_map, w_map


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, params, interpret, *args):
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
    )(*args)


def kl_forward(h_TxD, w_DxV, teacher, route_Tx1, blocks, n_active, *, bt, bv, interpret=False):
    """(kl, lse_s, lse_t) [T, 1] float32; rows of inactive blocks are unspecified."""
    (num_tokens, d), num_vocab = h_TxD.shape, w_DxV.shape[1]
    kind, tin = teacher
    is_logits = kind == "logits"
    nt, nv = num_tokens // bt, pl.cdiv(num_vocab, bv)
    in_specs, row, _, _ = _specs(d, bt, bv, nv, is_logits, token_axis=0, n_rows=1)
    kernel = functools.partial(
        _fwd_kernel, num_vocab=num_vocab, block_v=bv, teacher_is_logits=is_logits
    )
    col = jax.ShapeDtypeStruct((num_tokens, 1), jnp.float32)
    scratch = [pltpu.VMEM((bt, 1), jnp.float32)] * tiles.KL_STATE
    params = _compiler_params(bt, bv, d, h_TxD.dtype.itemsize, is_logits)
    return _call(
        kernel,
        (nt, nv),
        in_specs,
        [row] * 3,
        [col] * 3,
        scratch,
        params,
        interpret,
        blocks,
        n_active,
        h_TxD,
        tin,
        w_DxV,
        route_Tx1,
    )


def kl_backward(h_TxD, w_DxV, teacher, residual_rows, blocks, n_active, *, bt, bv, interpret=False):
    """(dh [T, D] float32, dW [D, V]); rows of inactive token blocks of dh are unspecified."""
    (num_tokens, d), num_vocab = h_TxD.shape, w_DxV.shape[1]
    kind, tin = teacher
    is_logits = kind == "logits"
    nt, nv = num_tokens // bt, pl.cdiv(num_vocab, bv)
    statics = dict(num_vocab=num_vocab, block_v=bv, teacher_is_logits=is_logits)
    params = _compiler_params(bt, bv, d, h_TxD.dtype.itemsize, is_logits)
    args = (blocks, n_active, h_TxD, tin, w_DxV, *residual_rows)

    in_specs, _, h_map, _ = _specs(d, bt, bv, nv, is_logits, token_axis=0, n_rows=5)
    dh = _call(
        functools.partial(_dh_kernel, **statics),
        (nt, nv),
        in_specs,
        pl.BlockSpec((bt, d), h_map),
        jax.ShapeDtypeStruct((num_tokens, d), jnp.float32),
        [pltpu.VMEM((bt, d), jnp.float32)],
        params,
        interpret,
        *args,
    )
    in_specs, _, _, w_map = _specs(d, bt, bv, nv, is_logits, token_axis=1, n_rows=5)
    dw = _call(
        functools.partial(_dw_kernel, **statics),
        (nv, nt),
        in_specs,
        pl.BlockSpec((d, bv), w_map),
        jax.ShapeDtypeStruct(w_DxV.shape, w_DxV.dtype),
        [pltpu.VMEM((d, bv), jnp.float32)],
        params,
        interpret,
        *args,
    )
    return dh, dw
