"""Grouped matmul on GPU (Pallas / Triton). Imported lazily.

Triton rather than Mosaic GPU: each program walks a data-dependent number of groups (or row
tiles) with masked rows, which Triton's pointer loads express directly, while Mosaic GPU's
TMA + wgmma pipeline wants static tile schedules. No output tile is shared between programs:
    gmm:  program (m tile, n tile) loops over the groups that touch its rows;
    tgmm: program (group, k tile, n tile) loops over the row tiles of its group.
Operands stay in global memory and are sliced per step; dims are padded to the tiles.
Runs in Pallas interpret mode on CPU (`interpret=True`), which is how the tests check it.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

DEFAULT_TILING = (64, 64, 128)  # (tm, tk, tn)


def _round_up(x, m):
    return -(-x // m) * m


def _pow2_at_least(x, floor=16):
    return max(floor, 1 << max(0, int(x) - 1).bit_length())


def _fit_tiling(tiling, m, k, n):
    """Triton blocks are powers of two and >= 16 for tensor-core dots."""
    tm, tk, tn = tiling or DEFAULT_TILING
    return (min(tm, _pow2_at_least(m)), min(tk, _pow2_at_least(k)), min(tn, _pow2_at_least(n)))


def _pad_to(x, shape):
    pads = [(0, s - d) for d, s in zip(x.shape, shape)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


def _compiler_params(interpret):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4, num_stages=3)


def _group_bounds(group_sizes_E, num_rows):
    sizes = group_sizes_E.astype(jnp.int32)
    cum = jnp.cumsum(sizes)
    return jnp.minimum(cum - sizes, num_rows), jnp.minimum(cum, num_rows)


def _gmm_kernel(
    lo_ref, hi_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *, tk, k_tiles, transpose_rhs
):
    i, j = pl.program_id(0), pl.program_id(1)
    tm, tn = out_ref.shape
    rows = i * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)

    def per_group(g, acc):
        mask = (rows >= starts_ref[g]) & (rows < ends_ref[g])

        def per_k(kk, acc):
            lhs = lhs_ref[pl.ds(i * tm, tm), pl.ds(kk * tk, tk)]
            lhs = jnp.where(mask, lhs, jnp.zeros((), lhs.dtype))
            if transpose_rhs:
                rhs = rhs_ref[g, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)]
                dims = (((1,), (1,)), ((), ()))
            else:
                rhs = rhs_ref[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)]
                dims = (((1,), (0,)), ((), ()))
            return acc + jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)

        return jax.lax.fori_loop(0, k_tiles, per_k, acc)

    acc = jax.lax.fori_loop(lo_ref[i], hi_ref[i] + 1, per_group, jnp.zeros((tm, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "tiling", "out_dtype", "interpret"))
def gmm(lhs_MxK, rhs, group_sizes_E, *, transpose_rhs, tiling, out_dtype, interpret=False):
    """[M, K] x [E, K, N] (or [E, N, K]) -> [M, N]; see `pallas_kernels.moe_dispatch.gmm`."""
    m, k = lhs_MxK.shape
    num_groups = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    tm, tk, tn = _fit_tiling(tiling, m, k, n)
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs = _pad_to(lhs_MxK, (mp, kp))
    rhs = _pad_to(rhs, (num_groups, np_, kp) if transpose_rhs else (num_groups, kp, np_))
    starts, ends = _group_bounds(group_sizes_E, mp)
    tile_first = jnp.arange(0, mp, tm, dtype=jnp.int32)
    # Groups touching a tile: from the first row's group to the last row's (clamped to E - 1;
    # a tile wholly past sum(group_sizes) gets hi < lo and no loop trip, so it stays 0).
    lo = jnp.searchsorted(ends, tile_first, side="right").astype(jnp.int32)
    hi = jnp.searchsorted(ends, tile_first + tm - 1, side="right").astype(jnp.int32)
    hi = jnp.minimum(hi, num_groups - 1)
    kernel = functools.partial(_gmm_kernel, tk=tk, k_tiles=kp // tk, transpose_rhs=transpose_rhs)
    out = pl.pallas_call(
        kernel,
        grid=(mp // tm, np_ // tn),
        in_specs=[pl.no_block_spec] * 6,
        out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=_compiler_params(interpret),
        interpret=interpret,
        name="moe_gmm",
    )(lo, hi, starts, ends, lhs, rhs)
    return out[:m, :n]


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, grad_ref, out_ref, *, tm):
    g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    tk, tn = out_ref.shape
    start, end = starts_ref[g], ends_ref[g]
    first_tile = start // tm
    num_tiles = jnp.where(end > start, (end - 1) // tm - first_tile + 1, 0)

    def per_tile(t, acc):
        m_tile = first_tile + t
        rows = m_tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        lhs = lhs_ref[pl.ds(m_tile * tm, tm), pl.ds(i * tk, tk)]
        lhs = jnp.where((rows >= start) & (rows < end), lhs, jnp.zeros((), lhs.dtype))
        grad = grad_ref[pl.ds(m_tile * tm, tm), pl.ds(j * tn, tn)]
        dims = (((0,), (0,)), ((), ()))
        return acc + jax.lax.dot_general(lhs, grad, dims, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, num_tiles, per_tile, jnp.zeros((tk, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "interpret"))
def tgmm(lhs_MxK, grad_MxN, group_sizes_E, *, tiling, out_dtype, interpret=False):
    """[M, K]^T x [M, N] per group -> [E, K, N]; see `pallas_kernels.moe_dispatch.tgmm`."""
    m, k = lhs_MxK.shape
    n = grad_MxN.shape[1]
    num_groups = group_sizes_E.shape[0]
    if m == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    tm, tk, tn = _fit_tiling(tiling, m, k, n)
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs = _pad_to(lhs_MxK, (mp, kp))
    grad = _pad_to(grad_MxN, (mp, np_))
    starts, ends = _group_bounds(group_sizes_E, mp)
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm),
        grid=(num_groups, kp // tk, np_ // tn),
        in_specs=[pl.no_block_spec] * 4,
        out_specs=pl.BlockSpec((pl.squeezed, tk, tn), lambda g, i, j: (g, i, j)),
        out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
        compiler_params=_compiler_params(interpret),
        interpret=interpret,
        name="moe_tgmm",
    )(starts, ends, lhs, grad)
    return out[:, :k, :n]
