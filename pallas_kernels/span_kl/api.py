"""Public ops: `span_kl` (routed exact KL over the vocabulary) and `token_logprobs`.

Both take hidden states and the unembedding W instead of logits, and never hold [T, V]: the
vocabulary is walked in blocks with an online log-sum-exp, and the backward pass (a custom_vjp)
recomputes logits block by block. Teacher inputs are stop-gradient. Both ops are per-token over a
flat token axis: flatten [B, T] to [B * T] before calling (under vmap the route-0 skipping
degrades to masking).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import _mesh
from pallas_kernels.span_kl import reference, xla

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_gpu", "interpret", "reference")
KERNELS = ("pallas_tpu", "pallas_gpu", "interpret")  # run through shard_map on a mesh
# (block_t, block_v) per implementation: big XLA tiles keep CPU matmuls efficient; TPU tiles are
# chosen per chip from its VMEM (kernel_tpu.choose_blocks; these are the fallbacks); GPU tiles
# suit one Triton program.
DEFAULT_BLOCKS = {
    "xla": (512, 4096),
    "pallas_tpu": (256, 512),
    "interpret": (256, 512),
    "pallas_gpu": (64, 128),
    "reference": (1, 1),
}


class _Config(NamedTuple):
    implementation: str
    block_t: int
    block_v: int


def default_implementation():
    """Best implementation for the target platform (`_mesh.target_platform`): Pallas on TPU/GPU,
    chunked XLA on CPU."""
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(_mesh.target_platform(), "xla")


def _check_2d(name, x, dims):
    if x.ndim != 2 or any(want is not None and got != want for got, want in zip(x.shape, dims)):
        names = ", ".join("?" if d is None else str(d) for d in dims)
        raise ValueError(f"{name} must have shape [{names}], got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")


def _check_ids(name, x, num_tokens):
    if x.shape != (num_tokens,) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be an integer array of shape ({num_tokens},), "
            f"got {x.dtype}{tuple(x.shape)}"
        )


def _resolve(implementation, block_t, block_v, num_tokens, num_vocab, tpu_tiles=None):
    """`tpu_tiles`: (D, itemsize, teacher_is_logits), to size Pallas TPU blocks to the VMEM of
    the chip being compiled for when the caller gives none."""
    impl = default_implementation() if implementation is None else implementation
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {impl!r}")
    default_t, default_v = DEFAULT_BLOCKS[impl]
    if impl in ("pallas_tpu", "interpret") and tpu_tiles:
        from pallas_kernels.span_kl import kernel_tpu

        d, itemsize, is_logits = tpu_tiles
        vmem = _mesh.vmem_bytes()
        if block_t is None or block_v is None:
            default_t, default_v = kernel_tpu.choose_blocks(d, itemsize, vmem, is_logits)
        else:
            need = kernel_tpu.vmem_need(block_t, block_v, d, itemsize, is_logits)
            if impl == "pallas_tpu" and need > 0.9 * vmem:
                raise ValueError(
                    f"span_kl blocks ({block_t}, {block_v}) at D={d} need ~{need / 2**20:.1f} "
                    f"MiB of VMEM; the target chip has {vmem / 2**20:.0f} MiB (leave block_t / "
                    "block_v unset to have them chosen for the chip)"
                )
    block_t = default_t if block_t is None else block_t
    block_v = default_v if block_v is None else block_v
    for name, value in (("block_t", block_t), ("block_v", block_v)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if impl in ("pallas_tpu", "interpret") and (block_t % 16 or block_v % 128):
        raise ValueError(
            f"{impl} needs block_t % 16 == 0 and block_v % 128 == 0, got {block_t}, {block_v}"
        )
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0
    if impl == "pallas_gpu" and not (pow2(block_t) and pow2(block_v)):
        raise ValueError(
            f"pallas_gpu needs block_t and block_v powers of two >= 16, got {block_t}, {block_v}"
        )
    if impl == "xla":
        block_t, block_v = min(block_t, num_tokens), min(block_v, num_vocab)
    return _Config(impl, block_t, block_v)


# ----------------------------------------------------------------------------- span_kl


def _pad_rows(x, rows):
    return x if rows == 0 else jnp.pad(x, ((0, rows),) + ((0, 0),) * (x.ndim - 1))


def _kl_stats(cfg, h_s, w, teacher, route_Tx1, blocks, n_active):
    if cfg.implementation in ("xla", "pallas_gpu"):
        if cfg.implementation == "pallas_gpu":
            from pallas_kernels.span_kl import kernel_gpu

            return kernel_gpu.kl_forward(h_s, w, teacher, route_Tx1, bt=cfg.block_t, bv=cfg.block_v)
        return xla.kl_forward(
            h_s, w, teacher, route_Tx1, blocks, n_active, bt=cfg.block_t, bv=cfg.block_v
        )
    from pallas_kernels.span_kl import kernel_tpu

    return kernel_tpu.kl_forward(
        h_s,
        w,
        teacher,
        route_Tx1,
        blocks,
        n_active,
        bt=cfg.block_t,
        bv=cfg.block_v,
        interpret=cfg.implementation == "interpret",
    )


def _kl_grads(cfg, h_s, w, teacher, rows, blocks, n_active):
    if cfg.implementation == "pallas_gpu":
        # The backward is matmul-bound: XLA tiles (cuBLAS) with their own, larger blocks.
        bt, bv = (
            min(DEFAULT_BLOCKS["xla"][0], h_s.shape[0]),
            min(DEFAULT_BLOCKS["xla"][1], w.shape[1]),
        )
        blocks, n_active = xla.active_blocks(rows[0][:, 0], bt)
        return xla.kl_backward(h_s, w, teacher, rows, blocks, n_active, bt=bt, bv=bv)
    if cfg.implementation == "xla":
        return xla.kl_backward(
            h_s, w, teacher, rows, blocks, n_active, bt=cfg.block_t, bv=cfg.block_v
        )
    from pallas_kernels.span_kl import kernel_tpu

    return kernel_tpu.kl_backward(
        h_s,
        w,
        teacher,
        rows,
        blocks,
        n_active,
        bt=cfg.block_t,
        bv=cfg.block_v,
        interpret=cfg.implementation == "interpret",
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _span_kl_core(cfg, h_s, w, h_t, teacher_logits, route_Tx1, blocks, n_active):
    return _span_kl_fwd(cfg, h_s, w, h_t, teacher_logits, route_Tx1, blocks, n_active)[0]


def _span_kl_fwd(cfg, h_s, w, h_t, teacher_logits, route_Tx1, blocks, n_active):
    teacher = ("hidden", h_t) if teacher_logits is None else ("logits", teacher_logits)
    kl, lse_s, lse_t = _kl_stats(cfg, h_s, w, teacher, route_Tx1, blocks, n_active)
    # Pallas leaves skipped blocks unwritten: zero them so no garbage reaches the backward.
    kl, lse_s, lse_t = (jnp.where(route_Tx1 != 0, x, 0.0) for x in (kl, lse_s, lse_t))
    res = (h_s, w, h_t, teacher_logits, route_Tx1, blocks, n_active, kl, lse_s, lse_t)
    return kl, res


def _span_kl_bwd(cfg, res, g_Tx1):
    h_s, w, h_t, teacher_logits, route_Tx1, blocks, n_active, kl, lse_s, lse_t = res
    teacher = ("hidden", h_t) if teacher_logits is None else ("logits", teacher_logits)
    rows = (route_Tx1, lse_s, lse_t, kl, g_Tx1.astype(jnp.float32))
    dh, dw = _kl_grads(cfg, h_s, w, teacher, rows, blocks, n_active)
    dh = jnp.where(route_Tx1 != 0, dh, 0.0).astype(h_s.dtype)
    zeros = lambda x: None if x is None else jnp.zeros_like(x)
    return dh, dw.astype(w.dtype), zeros(h_t), zeros(teacher_logits), None, None, None


_span_kl_core.defvjp(_span_kl_fwd, _span_kl_bwd)


def span_kl(
    h_student_TxD,
    w_DxV,
    route_T,
    *,
    h_teacher_TxD=None,
    teacher_logits_TxV=None,
    implementation=None,
    block_t=None,
    block_v=None,
    compact=None,
):
    """Per-token routed KL between student and teacher softmaxes over the full vocabulary.

    Args:
      h_student_TxD: student hidden states [T, D] (float32 or bfloat16).
      w_DxV: unembedding [D, V], shared by student and teacher.
      route_T: int [T]: ROUTE_NONE (0) -> 0, ROUTE_FKL (1) -> KL(p_teacher || p_student),
        ROUTE_RKL (2) -> KL(p_student || p_teacher).
      h_teacher_TxD: teacher hidden states [T, D] (same W); or
      teacher_logits_TxV: teacher logits [T, V]. Exactly one of the two. Stop-gradient.
      implementation: one of IMPLEMENTATIONS, or None for `default_implementation()`.
      block_t, block_v: tile sizes (None: DEFAULT_BLOCKS[implementation]).
      compact: sort routed tokens to the front first so they fill few token blocks and the rest
        are skipped (None: on when the teacher comes as hidden states; a gather of teacher
        logits would copy [T, V]).
    Returns:
      kl_T: float32 [T], 0 where route is 0. Differentiable w.r.t. h_student_TxD and w_DxV
      (custom_vjp; matmuls in the input dtype, accumulation in float32).
    """
    _check_2d("h_student_TxD", h_student_TxD, (None, None))
    num_tokens, d = h_student_TxD.shape
    _check_2d("w_DxV", w_DxV, (d, None))
    num_vocab = w_DxV.shape[1]
    _check_ids("route_T", route_T, num_tokens)
    if (h_teacher_TxD is None) == (teacher_logits_TxV is None):
        raise ValueError("span_kl needs exactly one of h_teacher_TxD and teacher_logits_TxV")
    if h_teacher_TxD is not None:
        _check_2d("h_teacher_TxD", h_teacher_TxD, (num_tokens, d))
    else:
        _check_2d("teacher_logits_TxV", teacher_logits_TxV, (num_tokens, num_vocab))
    dtype = jnp.result_type(h_student_TxD, w_DxV)
    tpu_tiles = (d, jnp.dtype(dtype).itemsize, teacher_logits_TxV is not None)
    cfg = _resolve(implementation, block_t, block_v, num_tokens, num_vocab, tpu_tiles)
    if cfg.implementation == "reference":
        return reference.span_kl(
            h_student_TxD,
            w_DxV,
            route_T,
            h_teacher_TxD=h_teacher_TxD,
            teacher_logits_TxV=teacher_logits_TxV,
        )
    if num_tokens == 0:
        return jnp.zeros((0,), jnp.float32)
    mesh = _mesh.context_mesh() if cfg.implementation in KERNELS else None
    local = functools.partial(_span_kl_local, cfg, compact)
    if mesh is None:
        return local(h_student_TxD, w_DxV, route_T, h_teacher_TxD, teacher_logits_TxV)
    return _token_sharded(
        local, mesh, h_student_TxD, w_DxV, route_T, h_teacher_TxD, teacher_logits_TxV
    )


def _token_sharded(local, mesh, h_s, w, route, h_t, tl):
    """`local` on each device's share of the tokens (split over every mesh axis that divides
    T), with W gathered whole; the Mosaic kernels cannot be partitioned by XLA."""
    axes = _mesh.split_axes(mesh, h_s.shape[0])
    tok = _mesh.spec_entry(axes)
    rows = P(tok, None)
    specs = (rows, P(), P(tok), rows, rows)
    return _mesh.shard_map_some(local, mesh, (h_s, w, route, h_t, tl), specs, P(tok))


def _span_kl_local(cfg, compact, h_student_TxD, w_DxV, route_T, h_teacher_TxD, teacher_logits_TxV):
    """`span_kl` on one device's tokens (the whole op when there is no mesh)."""
    num_tokens = h_student_TxD.shape[0]
    dtype = jnp.result_type(h_student_TxD, w_DxV)
    h_s, w = h_student_TxD.astype(dtype), w_DxV.astype(dtype)
    h_t = None if h_teacher_TxD is None else jax.lax.stop_gradient(h_teacher_TxD).astype(dtype)
    tl = None if teacher_logits_TxV is None else jax.lax.stop_gradient(teacher_logits_TxV)
    route = route_T.astype(jnp.int32)

    perm = None
    if compact if compact is not None else tl is None:
        perm = jnp.argsort(route == 0, stable=True)  # routed tokens first, order kept
        take = lambda x: None if x is None else jnp.take(x, perm, axis=0)
        h_s, h_t, tl, route = take(h_s), take(h_t), take(tl), take(route)

    pad = 0
    if cfg.implementation in ("pallas_tpu", "interpret"):
        pad = -num_tokens % cfg.block_t  # kernels want whole token blocks; padding is route 0
        h_s, route = _pad_rows(h_s, pad), _pad_rows(route, pad)
        h_t = None if h_t is None else _pad_rows(h_t, pad)
        tl = None if tl is None else _pad_rows(tl, pad)
    blocks, n_active = xla.active_blocks(route, cfg.block_t)
    kl = _span_kl_core(cfg, h_s, w, h_t, tl, route[:, None], blocks, n_active)[:num_tokens, 0]
    if perm is not None:
        kl = jnp.zeros_like(kl).at[perm].set(kl, unique_indices=True)
    return kl


# ----------------------------------------------------------------------- token_logprobs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _logp_core(cfg, h, w, target_Tx1):
    logp, entropy, _ = xla.logp_forward(h, w, target_Tx1, bt=cfg.block_t, bv=cfg.block_v)
    return logp, entropy


def _logp_fwd(cfg, h, w, target_Tx1):
    logp, entropy, lse = xla.logp_forward(h, w, target_Tx1, bt=cfg.block_t, bv=cfg.block_v)
    return (logp, entropy), (h, w, target_Tx1, lse, entropy)


def _logp_bwd(cfg, res, grads):
    h, w, target_Tx1, lse, entropy = res
    g_logp, g_ent = (g.astype(jnp.float32) for g in grads)
    rows = (target_Tx1, lse, entropy, g_logp, g_ent)
    dh, dw = xla.logp_backward(h, w, rows, bt=cfg.block_t, bv=cfg.block_v)
    return dh.astype(h.dtype), dw.astype(w.dtype), None


_logp_core.defvjp(_logp_fwd, _logp_bwd)


def token_logprobs(h_TxD, w_DxV, targets_T, *, implementation=None, block_t=None, block_v=None):
    """log p(target) and entropy of softmax(h @ W) per token, without materialising [T, V].

    Args:
      h_TxD: hidden states [T, D]; w_DxV: unembedding [D, V]; targets_T: int [T] in [0, V)
        (an out-of-range target gives logp = -lse, i.e. a logit of 0).
      implementation: "reference" materialises logits; every other value (and None) runs the
        chunked XLA path, which is also what Pallas backends use (no dedicated kernel yet). On a
        mesh (`jax.set_mesh`) it runs under shard_map on each device's tokens, as `span_kl`.
    Returns:
      (logp_T, entropy_T), float32 [T] each. Both are differentiable w.r.t. h and W (the
      entropy gradient is exact, -p (log p + H); wrap it in stop_gradient if it is only a
      diagnostic).
    """
    _check_2d("h_TxD", h_TxD, (None, None))
    num_tokens, d = h_TxD.shape
    _check_2d("w_DxV", w_DxV, (d, None))
    _check_ids("targets_T", targets_T, num_tokens)
    impl = implementation
    if impl is not None and impl != "reference":
        impl = "xla" if impl in IMPLEMENTATIONS else impl
    cfg = _resolve(impl or "xla", block_t, block_v, num_tokens, w_DxV.shape[1])
    if cfg.implementation == "reference":
        return reference.token_logprobs(h_TxD, w_DxV, targets_T)
    if num_tokens == 0:
        return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32)
    dtype = jnp.result_type(h_TxD, w_DxV)
    target_Tx1 = targets_T.astype(jnp.int32)[:, None]
    local = functools.partial(_logp_core, cfg)
    h, w = h_TxD.astype(dtype), w_DxV.astype(dtype)
    mesh = _mesh.context_mesh()
    if mesh is None:
        logp, entropy = local(h, w, target_Tx1)
    else:
        # The token-block loop runs on each device's own tokens (W gathered whole, its gradient
        # summed over the shards): on the global array XLA partitions the loop's dynamic slices
        # by gathering every token to every device.
        tok = _mesh.spec_entry(_mesh.split_axes(mesh, num_tokens))
        rows = P(tok, None)
        logp, entropy = _mesh.shard_map(local, mesh, (rows, P(), rows), (rows, rows))(
            h, w, target_Tx1
        )
    return logp[:, 0], entropy[:, 0]
