"""Memory-light XLA drivers: loop over [block_t, block_v] tiles of the logits, never [T, V].

The vocabulary is the outer loop (`lax.scan` over full blocks plus one static tail block, so W
is sliced in place and never padded or copied); tokens are the inner loop, a `fori_loop` over
the *active* token blocks only (those holding a routed token), so route-0 blocks cost nothing.
Temporaries are O(block_t * block_v) plus per-token columns; the backward pass carries dh [T, D]
in float32 and writes dW [D, V] block by block.

The last token block is clamped to end at T (no padding of h or of teacher logits); its rows that
belong to the previous block are "not owned" and are masked out of every update.
"""

import jax.numpy as jnp
from jax import lax

from pallas_kernels.span_kl import tiles


def active_blocks(route_T, block_t):
    """Indices of the token blocks that hold a routed token, padded with the last one.

    Returns (blocks_N int32 [num_blocks], n_active int32 [1]). Padding with the last active
    index lets Pallas index maps revisit the same block (no new DMA) on skipped grid steps.
    """
    num_tokens = route_T.shape[0]
    num_blocks = -(-num_tokens // block_t)
    routed = jnp.pad(route_T != 0, (0, num_blocks * block_t - num_tokens))
    routed_N = jnp.any(routed.reshape(num_blocks, block_t), axis=-1)
    n_active = jnp.sum(routed_N).astype(jnp.int32)
    blocks = jnp.nonzero(routed_N, size=num_blocks, fill_value=0)[0].astype(jnp.int32)
    last = blocks[jnp.maximum(n_active - 1, 0)]
    blocks = jnp.where(jnp.arange(num_blocks) < n_active, blocks, last)
    return blocks, n_active.reshape(1)


def all_blocks(num_tokens, block_t):
    """Every token block active (for ops without routing)."""
    num_blocks = -(-num_tokens // block_t)
    return jnp.arange(num_blocks, dtype=jnp.int32), jnp.full((1,), num_blocks, jnp.int32)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _token_tile(num_tokens, block_t, block_index):
    """(start row, owned-row mask [bt, 1]) of a token block clamped to end at num_tokens."""
    own_start = block_index * block_t
    start = jnp.minimum(own_start, num_tokens - block_t)
    owned_Tx1 = (start + jnp.arange(block_t))[:, None] >= own_start
    return start, owned_Tx1


def _teacher_tile(teacher, start, block_t, v0, w_blk):
    """Teacher logits for one tile: from hidden states (same W) or sliced from given logits."""
    if teacher is None:
        return None
    kind, x = teacher
    if kind == "hidden":
        return _dot(lax.dynamic_slice_in_dim(x, start, block_t, 0), w_blk)
    width = w_blk.shape[1]
    return lax.dynamic_slice(x, (start, v0), (block_t, width)).astype(jnp.float32)


def _vocab_blocks(num_vocab, block_v):
    return num_vocab // block_v, num_vocab % block_v


def forward_tiles(h_TxD, w_DxV, teacher, rows, state0, update, blocks, n_active, *, bt, bv):
    """Fold every active tile into per-token running state.

    Args:
      h_TxD: hidden states. w_DxV: unembedding. teacher: None, ("hidden", h_TxD) or
        ("logits", logits_TxV). rows: tuple of per-token [T, 1] inputs handed to `update`.
      state0: tuple of [T, 1] float32 running state.
      update: (state_blk, rows_blk, s_TxV, t_TxV | None, v0) -> state_blk.
      blocks, n_active: from `active_blocks`.
    Returns the final state tuple ([T, 1] each; rows of inactive blocks keep state0).
    """
    num_tokens, num_vocab = h_TxD.shape[0], w_DxV.shape[1]
    bt, bv = min(bt, num_tokens), min(bv, num_vocab)

    def tile(k, state, w_blk, v0):
        start, owned_Tx1 = _token_tile(num_tokens, bt, blocks[k])
        take = lambda x: lax.dynamic_slice_in_dim(x, start, bt, 0)
        s_TxV = _dot(take(h_TxD), w_blk)
        t_TxV = _teacher_tile(teacher, start, bt, v0, w_blk)
        old = tuple(take(x) for x in state)
        new = update(old, tuple(take(r) for r in rows), s_TxV, t_TxV, v0)
        new = tuple(jnp.where(owned_Tx1, n, o) for n, o in zip(new, old))
        return tuple(lax.dynamic_update_slice_in_dim(x, n, start, 0) for x, n in zip(state, new))

    def vocab_pass(state, w_blk, v0):
        return lax.fori_loop(0, n_active[0], lambda k, st: tile(k, st, w_blk, v0), state)

    def scan_body(state, j):
        v0 = j * bv
        return vocab_pass(state, lax.dynamic_slice_in_dim(w_DxV, v0, bv, 1), v0), None

    num_full, tail = _vocab_blocks(num_vocab, bv)
    state, _ = lax.scan(scan_body, tuple(state0), jnp.arange(num_full))
    if tail:
        state = vocab_pass(state, w_DxV[:, num_full * bv :], num_full * bv)
    return state


def backward_tiles(h_TxD, w_DxV, teacher, rows, dlogits, blocks, n_active, *, bt, bv):
    """Gradients (dh [T, D] float32, dW [D, V] in W's dtype) from per-tile dlogits.

    dlogits: (rows_blk, s_TxV, t_TxV | None, v0) -> float32 [bt, bv] cotangent of the logits.
    Logits are recomputed per tile; dW is written once per vocabulary block.
    """
    num_tokens, num_vocab = h_TxD.shape[0], w_DxV.shape[1]
    bt, bv = min(bt, num_tokens), min(bv, num_vocab)
    mm_dtype = w_DxV.dtype  # matmul inputs stay in the model dtype, accumulation in float32

    def tile(k, carry, w_blk, v0):
        dh_TxD, dw_DxV = carry
        start, owned_Tx1 = _token_tile(num_tokens, bt, blocks[k])
        take = lambda x: lax.dynamic_slice_in_dim(x, start, bt, 0)
        h_blk = take(h_TxD)
        s_TxV = _dot(h_blk, w_blk)
        t_TxV = _teacher_tile(teacher, start, bt, v0, w_blk)
        ds_TxV = dlogits(tuple(take(r) for r in rows), s_TxV, t_TxV, v0)
        ds_TxV = jnp.where(owned_Tx1, ds_TxV, 0.0).astype(mm_dtype)
        dh_blk = take(dh_TxD) + lax.dot_general(
            ds_TxV, w_blk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        dw_DxV = dw_DxV + lax.dot_general(
            h_blk, ds_TxV, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return lax.dynamic_update_slice_in_dim(dh_TxD, dh_blk, start, 0), dw_DxV

    def vocab_pass(dh_TxD, w_blk, v0):
        dw0 = jnp.zeros(w_blk.shape, jnp.float32)
        body = lambda k, c: tile(k, c, w_blk, v0)
        dh_TxD, dw_blk = lax.fori_loop(0, n_active[0], body, (dh_TxD, dw0))
        return dh_TxD, dw_blk.astype(w_DxV.dtype)

    def scan_body(carry, j):
        dh_TxD, dw_DxV = carry
        v0 = j * bv
        dh_TxD, dw_blk = vocab_pass(dh_TxD, lax.dynamic_slice_in_dim(w_DxV, v0, bv, 1), v0)
        return (dh_TxD, lax.dynamic_update_slice_in_dim(dw_DxV, dw_blk, v0, 1)), None

    num_full, tail = _vocab_blocks(num_vocab, bv)
    carry0 = (jnp.zeros(h_TxD.shape, jnp.float32), jnp.zeros_like(w_DxV))
    (dh_TxD, dw_DxV), _ = lax.scan(scan_body, carry0, jnp.arange(num_full))
    if tail:
        v0 = num_full * bv
        dh_TxD, dw_blk = vocab_pass(dh_TxD, w_DxV[:, v0:], v0)
        dw_DxV = lax.dynamic_update_slice_in_dim(dw_DxV, dw_blk, v0, 1)
    return dh_TxD, dw_DxV


def cols_1xV(v0, width):
    """Global vocabulary ids of a tile's columns, [1, width] int32."""
    return (v0 + jnp.arange(width, dtype=jnp.int32))[None, :]


def kl_forward(h_TxD, w_DxV, teacher, route_Tx1, blocks, n_active, *, bt, bv):
    """(kl, lse_s, lse_t), each [T, 1] float32; only active token blocks are computed."""
    update = lambda st, rows, s, t, v0: tiles.kl_update(st, s, t)
    state0 = tiles.kl_init(route_Tx1.shape)
    state = forward_tiles(h_TxD, w_DxV, teacher, (), state0, update, blocks, n_active, bt=bt, bv=bv)
    return tiles.kl_finalize(state, route_Tx1)


def kl_backward(h_TxD, w_DxV, teacher, residual_rows, blocks, n_active, *, bt, bv):
    """(dh float32 [T, D], dW [D, V]); residual_rows = (route, lse_s, lse_t, kl, g), [T, 1]."""
    dlogits = lambda rows, s, t, v0: tiles.kl_dlogits(s, t, *rows)
    return backward_tiles(
        h_TxD, w_DxV, teacher, residual_rows, dlogits, blocks, n_active, bt=bt, bv=bv
    )


def logp_forward(h_TxD, w_DxV, target_Tx1, *, bt, bv):
    """(logp, entropy, lse), each [T, 1] float32."""
    blocks, n_active = all_blocks(h_TxD.shape[0], min(bt, h_TxD.shape[0]))

    def update(state, rows, s_TxV, t_TxV, v0):
        return tiles.logp_update(state, s_TxV, cols_1xV(v0, s_TxV.shape[1]), rows[0])

    state0 = tiles.logp_init(target_Tx1.shape)
    state = forward_tiles(
        h_TxD, w_DxV, None, (target_Tx1,), state0, update, blocks, n_active, bt=bt, bv=bv
    )
    return tiles.logp_finalize(state)


def logp_backward(h_TxD, w_DxV, residual_rows, *, bt, bv):
    """(dh, dW); residual_rows = (target, lse, entropy, g_logp, g_entropy), [T, 1] each."""
    blocks, n_active = all_blocks(h_TxD.shape[0], min(bt, h_TxD.shape[0]))

    def dlogits(rows, s_TxV, t_TxV, v0):
        return tiles.logp_dlogits(s_TxV, cols_1xV(v0, s_TxV.shape[1]), *rows)

    return backward_tiles(
        h_TxD, w_DxV, None, residual_rows, dlogits, blocks, n_active, bt=bt, bv=bv
    )
