"""Tile schedules shared by the TPU kernel and the blocked XLA path (pure jnp).

A row tile that straddles a group boundary is *visited* once per group it touches; a visit is a
(group, m tile) pair, in row order. The number of visits is data dependent but bounded by
m_tiles + E, which is the static length callers loop over.
"""

import jax
import jax.numpy as jnp


def visit_tables(group_sizes_E, num_rows, tm, *, trailing_group, every_group):
    """Per-visit group id and m-tile id [V], real visit count [1], group row starts/ends.

    trailing_group: add group E for the rows past sum(group_sizes), so every m tile is visited
        (gmm must write zeros there).
    every_group: give empty groups one (fully masked) visit, so their output is written
        (tgmm must write zeros there).
    """
    m_tiles = num_rows // tm
    sizes = group_sizes_E.astype(jnp.int32)
    if trailing_group:
        sizes = jnp.concatenate([sizes, (num_rows - jnp.sum(sizes))[None]])
    cum = jnp.cumsum(sizes)
    ends = jnp.minimum(cum, num_rows)
    starts = jnp.minimum(cum - sizes, num_rows)
    first_tile = jnp.minimum(starts // tm, m_tiles - 1)
    last_tile = (jnp.maximum(ends, 1) - 1) // tm
    tiles = jnp.where(ends > starts, last_tile - first_tile + 1, 0)
    if every_group:
        tiles = jnp.maximum(tiles, 1)
    visit_end = jnp.cumsum(tiles)
    num_visits = visit_end[-1]
    max_visits = m_tiles + group_sizes_E.shape[0]
    v = jnp.minimum(jnp.arange(max_visits, dtype=jnp.int32), num_visits - 1)
    group_V = jnp.searchsorted(visit_end, v, side="right").astype(jnp.int32)
    m_tile_V = first_tile[group_V] + v - (visit_end - tiles)[group_V]
    return group_V, m_tile_V.astype(jnp.int32), num_visits[None], starts, ends


def _row_mask(m_tile, start, end, tm):
    rows = m_tile * tm + jnp.arange(tm, dtype=jnp.int32)[:, None]
    return (rows >= start) & (rows < end)


def _zeros_varying_like(shape, *operands):
    """float32 zeros that vary over the same shard_map axes as `operands`, so a scan carry
    started from them has the type of the body's output (inside `shard_map`)."""
    seed = sum(jnp.where(False, x.reshape(-1)[:1].astype(jnp.float32), 0.0) for x in operands)
    return jnp.zeros(shape, jnp.float32) + seed.reshape(())


def gmm_blocked(lhs_MxK, rhs, group_sizes_E, *, transpose_rhs, out_dtype, tm=128):
    """Grouped matmul as a loop over visits of tm-row tiles: routed FLOPs only, any backend.

    XLA's CPU ragged_dot runs every group over every row (E times the work); this does one
    [tm, K] x [K, N] matmul per visit.
    """
    m, k = lhs_MxK.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    tm = min(tm, m)
    mp = -(-m // tm) * tm
    lhs = jnp.pad(lhs_MxK, ((0, mp - m), (0, 0)))
    group_V, m_tile_V, num_visits, starts, ends = visit_tables(
        group_sizes_E, mp, tm, trailing_group=False, every_group=False
    )

    def visit(out, v):
        g, m_tile = group_V[v], m_tile_V[v]
        active = v < num_visits[0]
        mask = _row_mask(m_tile, starts[g], ends[g], tm) & active
        tile = jax.lax.dynamic_slice_in_dim(lhs, m_tile * tm, tm)
        tile = jnp.where(mask, tile, jnp.zeros((), tile.dtype))
        w = rhs[g]
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        prod = jax.lax.dot_general(tile, w, dims, preferred_element_type=jnp.float32)
        acc = jax.lax.dynamic_slice_in_dim(out, m_tile * tm, tm)
        return jax.lax.dynamic_update_slice_in_dim(out, acc + prod, m_tile * tm, 0), None

    out0 = _zeros_varying_like((mp, n), lhs, rhs, group_sizes_E)
    out, _ = jax.lax.scan(visit, out0, jnp.arange(group_V.shape[0]))
    return out[:m].astype(out_dtype)


def tgmm_blocked(lhs_MxK, grad_MxN, group_sizes_E, *, out_dtype, tm=128):
    """Transposed grouped matmul as a loop over visits: out[g] += tile^T @ grad_tile."""
    m, k = lhs_MxK.shape
    n = grad_MxN.shape[1]
    num_groups = group_sizes_E.shape[0]
    if m == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    tm = min(tm, m)
    mp = -(-m // tm) * tm
    lhs = jnp.pad(lhs_MxK, ((0, mp - m), (0, 0)))
    grad = jnp.pad(grad_MxN, ((0, mp - m), (0, 0)))
    group_V, m_tile_V, num_visits, starts, ends = visit_tables(
        group_sizes_E, mp, tm, trailing_group=False, every_group=False
    )

    def visit(out, v):
        g, m_tile = group_V[v], m_tile_V[v]
        mask = _row_mask(m_tile, starts[g], ends[g], tm) & (v < num_visits[0])
        tile = jax.lax.dynamic_slice_in_dim(lhs, m_tile * tm, tm)
        tile = jnp.where(mask, tile, jnp.zeros((), tile.dtype))
        grad_tile = jax.lax.dynamic_slice_in_dim(grad, m_tile * tm, tm)
        prod = jax.lax.dot_general(
            tile, grad_tile, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return out.at[g].add(prod), None

    out0 = _zeros_varying_like((num_groups, k, n), lhs, grad, group_sizes_E)
    out, _ = jax.lax.scan(visit, out0, jnp.arange(group_V.shape[0]))
    return out.astype(out_dtype)
