"""Grouped-query softmax attention over a KV layout described in O(B * S), not by a dense mask.

`AttentionMask(kv_valid [B, S] bool, q_slot [B, T] int32)`: query t of row b sees key slot j iff
kv_valid[b, j] and j <= q_slot[b, t] (causal in cache-slot coordinates). It covers training over
[prompt | response] (`causal_mask`), left padding, the shared-prompt response pass over a
[prompt cache | response] layout (`AttentionMask.queries_from(P)`: q_slot = P + t), prefill into a
longer cache, and decode steps (`decode_mask`: T = 1, a slot per row). `q_offset` is static
metadata, set by the builders when every row's q_slot is `q_offset + arange(T)`: the fixed-shape
kernels (splash) need it.

A query that sees no key (a left-pad query, a padded row) outputs 0 in the "dense" and "chunked"
paths; the model never reads those positions. Splash gives a query whose own slot is invalid an
unspecified but finite output (it attends to pad keys), the same for every query that matters.

`attention(q, k, v, mask, implementation, block)` backends (`IMPLEMENTATIONS`):
- "dense": the reference, scores [B, Hkv, G, T, S] in float32 at once (tiny shapes, decode).
- "chunked": flash-style online softmax in plain JAX, every platform. Query blocks of `block`
  rows (`lax.map`) scan key blocks of `block` slots with a running max / sum in float32; key
  blocks no query of the block can see (beyond its last slot, or all invalid) are skipped with
  `lax.cond`. Memory O(B * H * block^2) for scores. Backward: a custom_vjp that keeps only the
  output and the log-sum-exp per query and recomputes the scores block by block (a dq pass over
  key blocks and a dk/dv pass over query blocks), so no [T, S] intermediate is saved for autodiff
  either - `jax.checkpoint` of a scan body would still save the running [T, D] accumulator of
  every key step, S / block times the output.
- "splash" (TPU; "splash_interpret" runs the same kernel in the Pallas interpreter, on CPU):
  `jax.experimental.pallas.ops.tpu.splash_attention` with a causal mask at the static q_offset
  and segment ids = kv_valid, for T > 1 when `q_offset` is known (training, prefill, and the
  shared-prompt pass, which is a causal mask at offset P). Shapes are padded to multiples of 128.
  Under a mesh it runs in shard_map over batch rows and kv heads. Decode steps and masks without
  a static offset (the rollout engine's per-row slots) go to "chunked" (T > 1) or "dense"
  (T = 1: its scores are [B, H, S], the size of the cache read anyway).
- "cudnn" (GPU): `jax.nn.dot_product_attention(implementation="cudnn")` for half-precision T > 1;
  cuDNN takes padding only as lengths (right padding) or a dense mask, so this path passes the
  boolean [B, 1, T, S] mask (1 byte per entry, no float scores). Opt-in; else "chunked".
- None / "": per platform (`_mesh.target_platform`): TPU -> "splash", else "chunked"; "dense"
  for T = 1 and when T and S both fit one block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _mesh

IMPLEMENTATIONS = ("dense", "chunked", "splash", "splash_interpret", "cudnn")
DEFAULT_BLOCK = 512
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: differences never overflow
_SPLASH_ALIGN = 128  # splash block sizes are multiples of 128 (TPU lanes)


# ---------------------------------------------------------------------------- the mask
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("kv_valid", "q_slot"),
    meta_fields=("q_offset",),
)
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query sees: kv_valid [B, S] bool, q_slot [B, T] int32 (see module doc).
    `q_offset`: static; not None iff q_slot[b, t] == q_offset + t for every row."""

    kv_valid: jax.Array
    q_slot: jax.Array
    q_offset: int | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, T, S)."""
        return (*self.q_slot.shape, self.kv_valid.shape[1])

    def dense(self):
        """The [B, T, S] boolean mask it describes (the reference; O(B * T * S))."""
        slots = jnp.arange(self.kv_valid.shape[1])
        return self.kv_valid[:, None, :] & (slots[None, None, :] <= self.q_slot[:, :, None])

    def queries_from(self, start: int) -> AttentionMask:
        """The same keys for queries start: (`causal_mask(valid).queries_from(P)` is the response
        pass over a [prompt cache | response] layout)."""
        off = None if self.q_offset is None else self.q_offset + start
        return AttentionMask(self.kv_valid, self.q_slot[:, start:], off)

    def keys_seen_before(self, t: int):
        """[B, t] bool: key slot j < t is valid and seen by some query (the causal hybrid layers
        use this as the row's real tokens)."""
        last = jnp.max(self.q_slot, axis=1)
        return self.kv_valid[:, :t] & (jnp.arange(t)[None] <= last[:, None])

    def sees_slot(self, slot_B):
        """[B] bool: whether each row's (only) query sees key `slot_B` (an int or [B]); False for
        slots outside [0, S) (idle engine rows)."""
        s = self.kv_valid.shape[1]
        slot = jnp.broadcast_to(jnp.asarray(slot_B, jnp.int32), self.kv_valid.shape[:1])
        at = jnp.clip(slot, 0, s - 1)[:, None]
        ok = jnp.take_along_axis(self.kv_valid, at, axis=1)[:, 0]
        return ok & (slot >= 0) & (slot < s) & (slot <= self.q_slot[:, 0])


def causal_mask(valid_BxT) -> AttentionMask:
    """Causal self-attention over T tokens (left / right padding: `valid_BxT` False)."""
    b, t = valid_BxT.shape
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    return AttentionMask(valid_BxT.astype(bool), slots, 0)


def prefill_mask(valid_BxT, cache_len: int) -> AttentionMask:
    """T prompt tokens written at slots [0, T) of a cache of `cache_len` slots (the rest not yet
    written, so marked valid for the decode steps that follow: queries here never reach them)."""
    b, t = valid_BxT.shape
    kv = jnp.concatenate([valid_BxT.astype(bool), jnp.ones((b, cache_len - t), bool)], axis=1)
    return AttentionMask(kv, causal_mask(valid_BxT).q_slot, 0)


def decode_mask(kv_valid_BxS, slot) -> AttentionMask:
    """One query per row at cache slot `slot` (an int, or [B] per row)."""
    b = kv_valid_BxS.shape[0]
    slot_B = jnp.broadcast_to(jnp.asarray(slot, jnp.int32), (b,))
    return AttentionMask(kv_valid_BxS.astype(bool), slot_B[:, None])


# ---------------------------------------------------------------------------- dispatch
def default_implementation(num_queries: int, num_keys: int, block: int = DEFAULT_BLOCK) -> str:
    """Per platform (module doc); "dense" for a decode step or when all scores fit one block
    (tiny shapes: the chunked path would run one block anyway)."""
    if num_queries == 1 or (num_queries <= block and num_keys <= block):
        return "dense"
    return "splash" if _mesh.target_platform() == "tpu" else "chunked"


def attention(q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, mask: AttentionMask, implementation=None, block=0):
    """Softmax attention, keys / values head-major (the KV cache's layout); H = K * G (GQA).

    Returns [B, T, H, D] in q's dtype (scores and softmax in float32). `implementation`: one of
    IMPLEMENTATIONS or None / "" (per platform; module doc). `block`: the chunked path's query
    and key block size (0: DEFAULT_BLOCK)."""
    b, t, h, d = q_BxTxHxD.shape
    kb, kv, s, kd = k_BxKxSxD.shape
    if (kb, kd) != (b, d) or v_BxKxSxD.shape != k_BxKxSxD.shape or h % kv:
        raise ValueError(
            f"attention: q {q_BxTxHxD.shape} [B, T, H, D] does not match k {k_BxKxSxD.shape} / "
            f"v {v_BxKxSxD.shape} [B, Hkv, S, D] with H a multiple of Hkv"
        )
    if not isinstance(mask, AttentionMask):
        raise TypeError(f"attention: mask must be an AttentionMask, got {type(mask).__name__}")
    if mask.kv_valid.shape != (b, s) or mask.q_slot.shape != (b, t):
        raise ValueError(
            f"attention: mask kv_valid {mask.kv_valid.shape} / q_slot {mask.q_slot.shape} do not "
            f"match [B={b}, S={s}] / [B={b}, T={t}]"
        )
    block = block or DEFAULT_BLOCK
    impl = implementation or default_implementation(t, s, block)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl in ("splash", "splash_interpret"):
        if splash_supports(mask):
            return splash_attention(
                q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, mask, interpret=impl == "splash_interpret"
            )
        impl = "dense" if t == 1 else "chunked"
    if impl == "cudnn":
        if _mesh.target_platform() != "gpu":
            raise ValueError(
                f"attention implementation 'cudnn' needs a GPU, not {_mesh.target_platform()}"
            )
        if t > 1 and q_BxTxHxD.dtype in (jnp.bfloat16, jnp.float16):
            return cudnn_attention(q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, mask)
        impl = "chunked"
    if impl == "dense":
        return dense_attention(q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, mask)
    return chunked_attention(q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, mask, block)


# ---------------------------------------------------------------------------- dense reference
def dense_attention(q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, mask: AttentionMask):
    """Scores [B, Hkv, G, T, S] at once, float32 softmax; queries that see no key output 0."""
    b, t, h, d = q_BxTxHxD.shape
    kv = k_BxKxSxD.shape[1]
    q = q_BxTxHxD.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k_BxKxSxD, preferred_element_type=jnp.float32) * (
        d**-0.5
    )
    visible = mask.dense()
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxD.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v_BxKxSxD)
    out = jnp.where(jnp.any(visible, axis=-1)[:, None, None, :, None], out, 0)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


# ---------------------------------------------------------------------------- chunked (flash)
def chunked_attention(q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, mask: AttentionMask, block: int):
    """Online-softmax attention in query / key blocks of `block` (module doc)."""
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"attention block must be a positive int, got {block!r}")
    b, t, h, d = q_BxTxHxD.shape
    kv, s = k_BxKxSxD.shape[1:3]
    bq, bk = min(block, t), min(block, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    q = q_BxTxHxD.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    q = jnp.pad(q, ((0, 0),) * 3 + ((0, tp - t), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, sp - s), (0, 0))) for x in (k_BxKxSxD, v_BxKxSxD))
    kv_valid = jnp.pad(mask.kv_valid, ((0, 0), (0, sp - s)))  # padded keys: invalid
    q_slot = jnp.pad(mask.q_slot.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1)
    o = _flash(q, k, v, kv_valid, q_slot, bq, bk)[:, :, :, :t]
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _blocks(x, axis, size):
    """x with `axis` split into blocks of `size`, the block index moved to the front."""
    shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x, axis):
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])


def _visible(slot_Bxq, valid_Bxk, start_k):
    """[B, 1, 1, bq, bk]: key start_k + c is valid and at or before the query's slot."""
    kslot = start_k + jnp.arange(valid_Bxk.shape[1])
    vis = valid_Bxk[:, None, :] & (kslot[None, None, :] <= slot_Bxq[:, :, None])
    return vis[:, None, None]


def _block_live(slot_Bxq, valid_Bxk, start_k):
    """Whether any query of the block can see any key of the key block (else it is skipped)."""
    last = jnp.max(slot_Bxq, axis=1)  # [B]
    return jnp.any(jnp.any(valid_Bxk, axis=1) & (start_k <= last))


def _scores(q_blk, k_blk, scale):
    return jnp.einsum("bkgqd,bkcd->bkgqc", q_blk, k_blk, preferred_element_type=jnp.float32) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, kv_valid, q_slot, bq, bk):
    return _flash_fwd(q, k, v, kv_valid, q_slot, bq, bk)[0]


def _flash_fwd(q, k, v, kv_valid, q_slot, bq, bk):
    """q [B, K, G, Tp, D], k / v [B, K, Sp, D] (Tp, Sp multiples of bq, bk) -> o, residuals."""
    # One barrier over every input: when this runs inside a differentiated scan (the layers) with
    # q varying and the masks loop-invariant, JAX's partial evaluation would otherwise split the
    # block loops, precompute the mask-only work and save it per (query block, key block, layer)
    # - O(T^2) residuals, the very memory this path exists to avoid.
    q, k, v, kv_valid, q_slot = jax.lax.optimization_barrier((q, k, v, kv_valid, q_slot))
    scale = q.shape[-1] ** -0.5
    kv_xs = (_blocks(k, 2, bk), _blocks(v, 2, bk), _blocks(kv_valid, 1, bk))
    starts = jnp.arange(k.shape[2] // bk, dtype=jnp.int32) * bk

    def q_block(xs):
        q_blk, slot = xs  # [B, K, G, bq, D], [B, bq]
        stats = q_blk.shape[:-1]

        def kv_step(carry, ys):
            k_blk, v_blk, valid, start = ys

            def compute(carry):
                m, l, acc = carry
                vis = _visible(slot, valid, start)
                s = jnp.where(vis, _scores(q_blk, k_blk, scale), _MASK_VALUE)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
                corr = jnp.exp(m - m_new)
                pv = jnp.einsum(
                    "bkgqc,bkcd->bkgqd",
                    p.astype(v_blk.dtype),
                    v_blk,
                    preferred_element_type=jnp.float32,
                )
                return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

            live = _block_live(slot, valid, start)
            return jax.lax.cond(live, compute, lambda c: c, carry), None

        init = (
            jnp.full(stats, _MASK_VALUE, jnp.float32),
            jnp.zeros(stats, jnp.float32),
            jnp.zeros(q_blk.shape, jnp.float32),
        )
        (m, l, acc), _ = jax.lax.scan(kv_step, init, (*kv_xs, starts))
        seen = l > 0
        o = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return o.astype(q.dtype), lse

    o, lse = jax.lax.map(q_block, (_blocks(q, 3, bq), _blocks(q_slot, 1, bq)))
    o, lse = _unblocks(o, 3), _unblocks(lse, 3)
    return o, (q, k, v, kv_valid, q_slot, o, lse)


def _flash_bwd(bq, bk, res, do):
    q, k, v, kv_valid, q_slot, o, lse = res
    scale = q.shape[-1] ** -0.5
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, K, G, Tp]
    q_xs = tuple(_blocks(x, 3, bq) for x in (q, do, lse, delta)) + (_blocks(q_slot, 1, bq),)
    kv_xs = (_blocks(k, 2, bk), _blocks(v, 2, bk), _blocks(kv_valid, 1, bk))
    k_starts = jnp.arange(k.shape[2] // bk, dtype=jnp.int32) * bk

    def grads_of_block(q_blk, do_blk, lse_blk, delta_blk, slot, k_blk, v_blk, valid, start):
        """(p, ds) of one (query block, key block) pair, float32 [B, K, G, bq, bk]."""
        vis = _visible(slot, valid, start)
        s = _scores(q_blk, k_blk, scale)
        p = jnp.where(vis, jnp.exp(s - lse_blk[..., None]), 0.0)
        dp = jnp.einsum("bkgqd,bkcd->bkgqc", do_blk, v_blk, preferred_element_type=jnp.float32)
        return p, p * (dp - delta_blk[..., None])

    def dq_block(xs):
        q_blk, do_blk, lse_blk, delta_blk, slot = xs

        def kv_step(dq, ys):
            k_blk, v_blk, valid, start = ys

            def compute(dq):
                _, ds = grads_of_block(
                    q_blk, do_blk, lse_blk, delta_blk, slot, k_blk, v_blk, valid, start
                )
                return dq + jnp.einsum(
                    "bkgqc,bkcd->bkgqd",
                    ds.astype(k_blk.dtype),
                    k_blk,
                    preferred_element_type=jnp.float32,
                )

            return jax.lax.cond(_block_live(slot, valid, start), compute, lambda x: x, dq), None

        dq, _ = jax.lax.scan(kv_step, jnp.zeros(q_blk.shape, jnp.float32), (*kv_xs, k_starts))
        return (dq * scale).astype(q.dtype)

    def dkv_block(xs):
        k_blk, v_blk, valid, start = xs

        def q_step(carry, ys):
            q_blk, do_blk, lse_blk, delta_blk, slot = ys

            def compute(carry):
                dk, dv = carry
                p, ds = grads_of_block(
                    q_blk, do_blk, lse_blk, delta_blk, slot, k_blk, v_blk, valid, start
                )
                dv = dv + jnp.einsum(
                    "bkgqc,bkgqd->bkcd",
                    p.astype(do_blk.dtype),
                    do_blk,
                    preferred_element_type=jnp.float32,
                )
                dk = dk + jnp.einsum(
                    "bkgqc,bkgqd->bkcd",
                    ds.astype(q_blk.dtype),
                    q_blk,
                    preferred_element_type=jnp.float32,
                )
                return dk, dv

            live = _block_live(slot, valid, start)
            return jax.lax.cond(live, compute, lambda c: c, carry), None

        zeros = jnp.zeros(k_blk.shape, jnp.float32)
        (dk, dv), _ = jax.lax.scan(q_step, (zeros, zeros), q_xs)
        return (dk * scale).astype(k.dtype), dv.astype(v.dtype)

    dq = _unblocks(jax.lax.map(dq_block, q_xs), 3)
    dk, dv = jax.lax.map(dkv_block, (*kv_xs, k_starts))
    return dq, _unblocks(dk, 2), _unblocks(dv, 2), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------- splash (TPU)
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def splash_supports(mask: AttentionMask) -> bool:
    """Splash needs a static causal offset and more than one query (module doc)."""
    _, t, s = mask.shape
    return mask.q_offset is not None and t > 1 and mask.q_offset + t <= s


def _splash_block(n: int) -> int:
    return next(b for b in (512, 256, 128) if n % b == 0)


def splash_attention(q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, mask: AttentionMask, interpret=False):
    """The library splash kernel (MQA form per kv head, vmapped over rows and kv heads) with
    CausalMask(offset=q_offset) and segment ids = kv_valid; q's segment id is that of its own
    slot, so every query sees at least its own key and no row is empty (padded or not)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
        splash_attention_mask as sm,
    )

    if not splash_supports(mask):
        raise ValueError(
            f"splash attention cannot express this mask (B, T, S = {mask.shape}, "
            f"q_offset={mask.q_offset}): it needs a static offset and T > 1"
        )
    b, t, h, d = q_BxTxHxD.shape
    kv, s = k_BxKxSxD.shape[1:3]
    g, off = h // kv, mask.q_offset
    tp = _round_up(t, _SPLASH_ALIGN)
    sp = _round_up(max(s, off + tp), _SPLASH_ALIGN)
    bq, bkv = _splash_block(tp), _splash_block(sp)
    blocks = sk.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    heads_mask = sm.MultiHeadMask([sm.CausalMask((tp, sp), offset=off)] * g)
    kernel = sk.make_splash_mqa_single_device(heads_mask, block_sizes=blocks, interpret=interpret)

    # [B, K, G, Tp, D] queries scaled (splash does not scale); [B, K, Sp, D] keys / values.
    q = q_BxTxHxD.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4) * jnp.asarray(
        d**-0.5, q_BxTxHxD.dtype
    )
    q = jnp.pad(q, ((0, 0),) * 3 + ((0, tp - t), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, sp - s), (0, 0))) for x in (k_BxKxSxD, v_BxKxSxD))
    seg_kv = jnp.pad(mask.kv_valid.astype(jnp.int32), ((0, 0), (0, sp - s)))
    seg_q = seg_kv[:, off : off + tp]

    def local(q, k, v, seg_q, seg_kv):
        def one(q_GxTxD, k_SxD, v_SxD, sq, skv):
            return kernel(q_GxTxD, k_SxD, v_SxD, segment_ids=sk.SegmentIds(q=sq, kv=skv))

        per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))  # over kv heads
        return jax.vmap(per_head)(q, k, v, seg_q, seg_kv)  # over rows

    mesh = _mesh.context_mesh()
    if mesh is None:
        o = local(q, k, v, seg_q, seg_kv)
    else:
        o = _sharded_splash(local, mesh, q, k, v, seg_q, seg_kv)
    o = o[:, :, :, :t].astype(q_BxTxHxD.dtype)
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _sharded_splash(local, mesh, q, k, v, seg_q, seg_kv):
    """shard_map over the mesh axes that divide the rows, then those that divide the kv heads:
    a pallas_call cannot be partitioned by GSPMD."""
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    rows = _mesh.split_axes(mesh, q.shape[0])
    heads = _mesh.split_axes(mesh, q.shape[1], exclude=rows)
    r, hd = _mesh.spec_entry(rows), _mesh.spec_entry(heads)
    qkv = P(r, hd)
    seg = P(r)
    return _mesh.shard_map(local, mesh, (qkv, qkv, qkv, seg, seg), qkv)(q, k, v, seg_q, seg_kv)


# ---------------------------------------------------------------------------- cuDNN (GPU)
def cudnn_attention(q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, mask: AttentionMask):
    """`jax.nn.dot_product_attention(implementation="cudnn")` with the boolean mask (module
    doc); rows whose queries see no key output 0 as in the other paths."""
    k, v = (x.transpose(0, 2, 1, 3) for x in (k_BxKxSxD, v_BxKxSxD))  # [B, S, K, D]
    visible = mask.dense()
    out = jax.nn.dot_product_attention(
        q_BxTxHxD, k, v, mask=visible[:, None], implementation="cudnn"
    )
    return jnp.where(jnp.any(visible, axis=-1)[:, :, None, None], out, 0).astype(q_BxTxHxD.dtype)
