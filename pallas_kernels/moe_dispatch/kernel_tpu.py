"""Grouped matmul on TPU (Pallas / Mosaic TPU), megablox-style tiling. Imported lazily.

Rows are tiled by tm. A tile that straddles a group boundary is *visited* once per group it
touches, each visit masking the rows of the other groups; consecutive visits of one tile keep
their float32 accumulator in VMEM. The grid's visit axis has a static length (m_tiles + E, an
upper bound); visits past the real count repeat the last real one's block indices and skip all
compute and stores. Visit -> (group, m tile) tables travel as scalar-prefetch operands.

Runs in Pallas interpret mode on CPU (`interpret=True`), which is how the tests check it.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _mesh, _precision
from pallas_kernels.moe_dispatch.tiling import visit_tables

DEFAULT_TILING = (512, 512, 512)  # (tm, tk, tn): three f32 512x512 tiles double-buffered < 16 MiB


def _round_up(x, m):
    return -(-x // m) * m


def _fit_tiling(tiling, m, k, n, dtype):
    """Clips tiles to the (padded) problem; sublane / lane alignment for Mosaic."""
    tm, tk, tn = tiling or DEFAULT_TILING
    sublane = 32 // jnp.dtype(dtype).itemsize  # 8 rows for f32, 16 for bf16
    tm = min(tm, _round_up(m, sublane))
    tk = min(tk, _round_up(k, 128))
    tn = min(tn, _round_up(n, 128))
    return tm, tk, tn


def _interpret_params(interpret):
    # The TPU interpreter fills uninitialised buffers with NaN and raises on out-of-bounds reads,
    # so a tile the kernel forgets to write shows up in the tests. Under shard_map on CPU devices
    # it deadlocks (its cross-device barriers wait on devices that run other grids), so there
    # the plain HLO interpreter runs the kernel.
    if not interpret:
        return False
    return True if _mesh.inside_shard_map() else pltpu.InterpretParams()


def _pad_to(x, shape):
    pads = [(0, s - d) for d, s in zip(x.shape, shape)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


def _row_mask(m_tile, starts_ref, ends_ref, g, tm):
    rows = m_tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    return (rows >= starts_ref[g]) & (rows < ends_ref[g])


def _gmm_kernel(
    group_ref, mtile_ref, nvis_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, acc_ref,
    *, num_groups, transpose_rhs,
):  # fmt: skip
    v, k = pl.program_id(1), pl.program_id(2)
    last_v = nvis_ref[0] - 1
    g, m_tile = group_ref[v], mtile_ref[v]
    active = v <= last_v
    first_of_tile = (v == 0) | (m_tile != mtile_ref[jnp.maximum(v - 1, 0)])
    last_of_tile = (v == last_v) | (m_tile != mtile_ref[jnp.minimum(v + 1, last_v)])

    @pl.when(active & first_of_tile & (k == 0))
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active & (g < num_groups))  # group E is the trailing no-group rows: stays 0
    def _():
        mask = _row_mask(m_tile, starts_ref, ends_ref, g, acc_ref.shape[0])
        lhs = jnp.where(mask, lhs_ref[...], jnp.zeros((), lhs_ref.dtype))
        contract = 1 if transpose_rhs else 0
        lhs, rhs = _precision.same_dtype(lhs, rhs_ref[...])
        acc_ref[...] += jax.lax.dot_general(
            lhs, rhs, (((1,), (contract,)), ((), ())), preferred_element_type=jnp.float32,
            precision=_precision.mxu(lhs, rhs),
        )  # fmt: skip

    @pl.when(active & last_of_tile & (k == pl.num_programs(2) - 1))
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "tiling", "out_dtype", "interpret"))
def gmm(lhs_MxK, rhs, group_sizes_E, *, transpose_rhs, tiling, out_dtype, interpret):
    """[M, K] x [E, K, N] (or [E, N, K]) -> [M, N]; see `pallas_kernels.moe_dispatch.gmm`."""
    m, k = lhs_MxK.shape
    num_groups = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    tm, tk, tn = _fit_tiling(tiling, m, k, n, lhs_MxK.dtype)
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs = _pad_to(lhs_MxK, (mp, kp))
    rhs = _pad_to(rhs, (num_groups, np_, kp) if transpose_rhs else (num_groups, kp, np_))
    tables = visit_tables(group_sizes_E, mp, tm, trailing_group=True, every_group=False)
    max_visits = tables[0].shape[0]

    def rhs_map(j, v, kk, group_ref, *_):
        g = jnp.minimum(group_ref[v], num_groups - 1)
        return (g, j, kk) if transpose_rhs else (g, kk, j)

    rhs_block = (pl.squeezed, tn, tk) if transpose_rhs else (pl.squeezed, tk, tn)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(np_ // tn, max_visits, kp // tk),
        in_specs=[
            pl.BlockSpec((tm, tk), lambda j, v, kk, group_ref, mtile_ref, *_: (mtile_ref[v], kk)),
            pl.BlockSpec(rhs_block, rhs_map),
        ],
        out_specs=pl.BlockSpec(
            (tm, tn), lambda j, v, kk, group_ref, mtile_ref, *_: (mtile_ref[v], j)
        ),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
    )
    kernel = functools.partial(_gmm_kernel, num_groups=num_groups, transpose_rhs=transpose_rhs)
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=_interpret_params(interpret),
        name="moe_gmm",
    )(*tables, lhs, rhs)
    return out[:m, :n]


def _tgmm_kernel(
    group_ref, mtile_ref, nvis_ref, starts_ref, ends_ref, lhs_ref, grad_ref, out_ref, acc_ref,
):  # fmt: skip
    v = pl.program_id(2)
    last_v = nvis_ref[0] - 1
    g, m_tile = group_ref[v], mtile_ref[v]
    active = v <= last_v
    first_of_group = (v == 0) | (g != group_ref[jnp.maximum(v - 1, 0)])
    last_of_group = (v == last_v) | (g != group_ref[jnp.minimum(v + 1, last_v)])

    @pl.when(active & first_of_group)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active)
    def _():
        mask = _row_mask(m_tile, starts_ref, ends_ref, g, lhs_ref.shape[0])
        lhs = jnp.where(mask, lhs_ref[...], jnp.zeros((), lhs_ref.dtype))
        lhs, grad = _precision.same_dtype(lhs, grad_ref[...])
        acc_ref[...] += jax.lax.dot_general(
            lhs, grad, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32,
            precision=_precision.mxu(lhs, grad),
        )  # fmt: skip

    @pl.when(active & last_of_group)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "interpret"))
def tgmm(lhs_MxK, grad_MxN, group_sizes_E, *, tiling, out_dtype, interpret):
    """[M, K]^T x [M, N] per group -> [E, K, N]; see `pallas_kernels.moe_dispatch.tgmm`."""
    m, k = lhs_MxK.shape
    n = grad_MxN.shape[1]
    num_groups = group_sizes_E.shape[0]
    if m == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    tm, tk, tn = _fit_tiling(tiling, m, k, n, lhs_MxK.dtype)
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs = _pad_to(lhs_MxK, (mp, kp))
    grad = _pad_to(grad_MxN, (mp, np_))
    tables = visit_tables(group_sizes_E, mp, tm, trailing_group=False, every_group=True)
    max_visits = tables[0].shape[0]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(kp // tk, np_ // tn, max_visits),
        in_specs=[
            pl.BlockSpec((tm, tk), lambda i, j, v, group_ref, mtile_ref, *_: (mtile_ref[v], i)),
            pl.BlockSpec((tm, tn), lambda i, j, v, group_ref, mtile_ref, *_: (mtile_ref[v], j)),
        ],
        out_specs=pl.BlockSpec(
            (pl.squeezed, tk, tn), lambda i, j, v, group_ref, *_: (group_ref[v], i, j)
        ),
        scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
    )
    out = pl.pallas_call(
        _tgmm_kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=_interpret_params(interpret),
        name="moe_tgmm",
    )(*tables, lhs, grad)
    return out[:, :k, :n]
