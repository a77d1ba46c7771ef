"""Causal sliding-window softmax attention in O(T * w): the softmax half of hybrid attention.

Queries go in blocks of C; block c only needs key blocks c - nb .. c with nb = ceil((w-1)/C),
so scores are [C, (nb+1) C] per block, never [T, T]. The XLA path is differentiated by autodiff
(its residuals are those O(T * w) probabilities). The Pallas kernel (TPU, Triton and interpret
alike: no carried state, so every grid point is independent) runs an online softmax over the
nb + 1 key blocks, each fed by its own BlockSpec on the same array with a shifted index map; its
custom_vjp backward re-runs the XLA path's VJP.

Head-major layout here: q [B, H, T, D], k [B, H, T, D], v [B, H, T, Dv], T % C == 0.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

f32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))


def _n_back(window, block):
    return -(-(window - 1) // block)


def window_attention_xla(q, k, v, *, window, scale, block):
    """Returns o [B, H, T, Dv] float32."""
    bsz, h, t, d = q.shape
    nq, nb = t // block, _n_back(window, block)
    blocks = lambda x: x.reshape(bsz, h, -1, block, x.shape[-1])
    front = [(0, 0), (0, 0), (nb * block, 0), (0, 0)]
    k_blk, v_blk = blocks(jnp.pad(k, front)), blocks(jnp.pad(v, front))
    # Key window of query block c: key blocks c - nb .. c, concatenated along the key axis.
    k_win = jnp.concatenate([k_blk[:, :, i : i + nq] for i in range(nb + 1)], axis=3)
    v_win = jnp.concatenate([v_blk[:, :, i : i + nq] for i in range(nb + 1)], axis=3)
    logits = jnp.einsum("bhncd,bhnkd->bhnck", blocks(q).astype(f32), k_win.astype(f32)) * scale
    q_pos = jnp.arange(nq)[:, None, None] * block + jnp.arange(block)[None, :, None]
    k_pos = (jnp.arange(nq)[:, None, None] - nb) * block + jnp.arange((nb + 1) * block)
    dist = q_pos - k_pos  # [NQ, C, (nb+1) C]
    valid = (dist >= 0) & (dist < window) & (k_pos >= 0)
    probs = jax.nn.softmax(jnp.where(valid, logits, -jnp.inf), axis=-1)
    o = jnp.einsum("bhnck,bhnkv->bhncv", probs, v_win.astype(f32))
    return o.reshape(bsz, h, t, -1)


def window_kernel(q_ref, *refs, n_back, block, window, scale):
    """Query block [C, D] against key blocks c, c-1, ..., c-n_back (online softmax)."""
    o_ref = refs[-1]
    c = pl.program_id(1)
    q = q_ref[...].astype(f32) * scale
    q_pos = c * block + jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
    m = jnp.full((block, 1), -jnp.inf, f32)
    l = jnp.zeros((block, 1), f32)
    acc = jnp.zeros((block, o_ref.shape[-1]), f32)
    # j = 0 (the diagonal block) first: every row has its own key there, so m is finite after.
    for j in range(n_back + 1):
        k = refs[2 * j][...].astype(f32)
        v = refs[2 * j + 1][...].astype(f32)
        k_pos = (c - j) * block + jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
        dist = q_pos - k_pos
        valid = (dist >= 0) & (dist < window) & (k_pos >= 0)
        s = jnp.where(valid, jax.lax.dot_general(q, k, _NT, preferred_element_type=f32), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - m_new)
        corr = jnp.exp(m - m_new)
        l = corr * l + jnp.sum(p, axis=-1, keepdims=True)
        acc = corr * acc + jnp.dot(p, v, preferred_element_type=f32)
        m = m_new
    o_ref[...] = (acc / l).astype(o_ref.dtype)


def _window_pallas_forward(impl, window, scale, block, q, k, v):
    bsz, h, t, d = q.shape
    dv = v.shape[-1]
    nb = _n_back(window, block)
    flat = lambda x: x.reshape(bsz * h, t, x.shape[-1])
    kv_specs, kv_args = [], []
    for j in range(nb + 1):
        for x in (k, v):
            # Blocks before the start clamp to 0; the kernel masks them by position.
            index = lambda i, c, j=j: (i, jnp.maximum(c - j, 0), 0)
            kv_specs.append(pl.BlockSpec((None, block, x.shape[-1]), index))
            kv_args.append(flat(x))
    kwargs = {}
    if impl == "pallas_tpu":
        from jax.experimental.pallas import tpu as pltpu

        kwargs["compiler_params"] = pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel")
        )
    elif impl == "pallas_gpu":
        from jax.experimental.pallas import triton as pltriton

        kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=4, num_stages=2)
    kernel = functools.partial(window_kernel, n_back=nb, block=block, window=window, scale=scale)
    o = pl.pallas_call(
        kernel,
        grid=(bsz * h, t // block),
        in_specs=[pl.BlockSpec((None, block, d), lambda i, c: (i, c, 0)), *kv_specs],
        out_specs=pl.BlockSpec((None, block, dv), lambda i, c: (i, c, 0)),
        out_shape=jax.ShapeDtypeStruct((bsz * h, t, dv), f32),
        interpret=impl == "interpret",
        **kwargs,
    )(flat(q), *kv_args)
    return o.reshape(bsz, h, t, dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def window_attention_pallas(impl, window, scale, block, q, k, v):
    """Pallas forward ("pallas_tpu" | "pallas_gpu" | "interpret"); returns o float32."""
    return _window_pallas_forward(impl, window, scale, block, q, k, v)


def _pallas_fwd(impl, window, scale, block, q, k, v):
    return _window_pallas_forward(impl, window, scale, block, q, k, v), (q, k, v)


def _pallas_bwd(impl, window, scale, block, residuals, do):
    del impl
    xla = functools.partial(window_attention_xla, window=window, scale=scale, block=block)
    _, vjp = jax.vjp(xla, *residuals)
    return vjp(do)


window_attention_pallas.defvjp(_pallas_fwd, _pallas_bwd)
