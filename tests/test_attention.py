"""jaxtrace.models.attention: the O(B * S) mask, and every backend against a per-query loop.

The reference is written out per (row, head, query) in NumPy from the mask's definition (query t
of row b sees key j iff kv_valid[b, j] and j <= q_slot[b, t]; a query that sees nothing gives 0).
The dense path is checked against it, the chunked path and the splash kernel (Pallas interpreter
on CPU) against dense, values and gradients, at shapes no block divides."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxtrace import models, steps
from jaxtrace.models import attention as A
from jaxtrace.models.config import ModelConfig


def _qkv(b, t, s, h, kv, d, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k = rng.normal(size=(b, kv, s, d)).astype(np.float32)
    v = rng.normal(size=(b, kv, s, d)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _loop_reference(q, k, v, kv_valid, q_slot):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    kv_valid, q_slot = np.asarray(kv_valid), np.asarray(q_slot)
    b, t, h, d = q.shape
    g = h // k.shape[1]
    out = np.zeros_like(q)
    for r in range(b):
        for i in range(t):
            seen = [j for j in range(k.shape[2]) if kv_valid[r, j] and j <= q_slot[r, i]]
            if not seen:
                continue
            for hh in range(h):
                scores = np.array([q[r, i, hh] @ k[r, hh // g, j] for j in seen]) / np.sqrt(d)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[r, i, hh] = sum(pj * v[r, hh // g, j] for pj, j in zip(p, seen))
    return out


def _padded_valid(b, t):
    """Row 0 left padded, row 1 right padded, row 2 all padding, the rest full."""
    valid = np.ones((b, t), bool)
    valid[0, : t // 3] = False
    valid[1, t - t // 4 :] = False
    valid[2] = False
    return jnp.asarray(valid)


def _close(got, want, tol=2e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = float(jnp.max(jnp.abs(w))) + 1e-6
        err = float(jnp.max(jnp.abs(jnp.asarray(g, jnp.float32) - jnp.asarray(w, jnp.float32))))
        assert err <= tol * scale, (err, scale)


def _value_and_grads(impl, q, k, v, mask, block=0, weight=None):
    """(output, d/d(q, k, v) of sum(sin(output) * weight)), jitted (eager scans are slow)."""
    w = jnp.ones(mask.q_slot.shape) if weight is None else weight

    @jax.jit
    def run(q, k, v, mask, w):
        def loss(q, k, v):
            o = A.attention(q, k, v, mask, impl, block)
            return jnp.sum(jnp.sin(o) * w[:, :, None, None]), o

        (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return o, grads

    return run(q, k, v, mask, w)


# ---------------------------------------------------------------------------- the mask
def test_builders_equal_the_dense_masks_they_replace():
    valid = _padded_valid(4, 7)
    t = 7
    old_causal = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
    np.testing.assert_array_equal(models.causal_mask(valid).dense(), old_causal)
    tail = models.causal_mask(valid).queries_from(3)
    np.testing.assert_array_equal(tail.dense(), old_causal[:, 3:])
    s = 12
    kv = jnp.concatenate([valid, jnp.ones((4, s - t), bool)], axis=1)
    old_prefill = kv[:, None, :] & (jnp.arange(s)[None, None, :] <= jnp.arange(t)[None, :, None])
    np.testing.assert_array_equal(models.prefill_mask(valid, s).dense(), old_prefill)
    slot = jnp.array([7, 9, 11, 30])  # the last: an idle engine row past the cache
    old_decode = (kv & (jnp.arange(s)[None] <= slot[:, None]))[:, None, :]
    np.testing.assert_array_equal(models.decode_mask(kv, slot).dense(), old_decode)
    same_slot = kv[:, None] & (jnp.arange(s) <= 8)
    np.testing.assert_array_equal(models.decode_mask(kv, 8).dense(), same_slot)
    sees = models.decode_mask(kv, slot).sees_slot(slot)
    np.testing.assert_array_equal(sees, [True, True, True, False])


def test_mask_is_a_pytree_with_a_static_offset():
    mask = models.causal_mask(jnp.ones((2, 5), bool)).queries_from(2)
    leaves, tree = jax.tree.flatten(mask)
    assert len(leaves) == 2 and mask.q_offset == 2 and mask.shape == (2, 3, 5)
    assert jax.tree.unflatten(tree, leaves).q_offset == 2
    np.testing.assert_array_equal(mask.q_slot, [[2, 3, 4]] * 2)
    assert models.decode_mask(jnp.ones((2, 5), bool), 3).q_offset is None


# ---------------------------------------------------------------------------- dense vs loop
def test_dense_equals_the_loop_reference():
    b, t, h, kv, d = 4, 6, 4, 2, 8
    q, k, v = _qkv(b, t, t, h, kv, d)
    mask = models.causal_mask(_padded_valid(b, t))
    want = _loop_reference(q, k, v, mask.kv_valid, mask.q_slot)
    _close(A.attention(q, k, v, mask, "dense"), want, 1e-5)


# ---------------------------------------------------------------------------- chunked vs dense
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize(("t", "block"), [(13, 4), (9, 9), (5, 16)])
def test_chunked_equals_dense_causal_with_padding(groups, t, block):
    b, kv, d = 4, 2, 8
    q, k, v = _qkv(b, t, t, kv * groups, kv, d, seed=t)
    mask = models.causal_mask(_padded_valid(b, t))
    want = _value_and_grads("dense", q, k, v, mask)
    got = _value_and_grads("chunked", q, k, v, mask, block)
    _close(got, want)
    o = got[0]
    assert bool(jnp.all(o[2] == 0)) and bool(jnp.all(o[0, : t // 3] == 0))  # see no key -> 0
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got))


def test_chunked_decode_against_a_cache_with_per_row_slots():
    b, s, h, kv, d = 4, 11, 4, 1, 8
    q, k, v = _qkv(b, 1, s, h, kv, d, seed=3)
    kv_valid = jnp.ones((b, s), bool).at[0, :3].set(False).at[1, :5].set(False)
    slot = jnp.array([4, 10, 0, 11])  # row 3: idle (past the cache) -> sees nothing
    mask = models.decode_mask(kv_valid, slot)
    want = _loop_reference(q, k, v, mask.kv_valid, mask.q_slot)
    _close(A.attention(q, k, v, mask, "dense"), want, 1e-5)
    _close(_value_and_grads("chunked", q, k, v, mask, 4), _value_and_grads("dense", q, k, v, mask))


def test_chunked_shared_prompt_offset_and_prefill_into_a_longer_cache():
    b, p, n, h, kv, d = 3, 7, 6, 4, 2, 8
    valid = jnp.concatenate([_padded_valid(b, p), jnp.ones((b, n), bool).at[1, 4:].set(False)], 1)
    q, k, v = _qkv(b, n, p + n, h, kv, d, seed=5)
    mask = models.causal_mask(valid).queries_from(p)
    want = _loop_reference(q, k, v, mask.kv_valid, mask.q_slot)
    _close(A.attention(q, k, v, mask, "dense"), want, 1e-5)
    _close(_value_and_grads("chunked", q, k, v, mask, 4), _value_and_grads("dense", q, k, v, mask))
    pre = models.prefill_mask(valid[:, :p], p + n)
    q, k, v = _qkv(b, p, p + n, h, kv, d, seed=6)
    _close(_value_and_grads("chunked", q, k, v, pre, 3), _value_and_grads("dense", q, k, v, pre))


def test_chunked_bfloat16_close_to_float32():
    b, t, h, kv, d = 2, 10, 4, 2, 16
    q, k, v = _qkv(b, t, t, h, kv, d, seed=8)
    mask = models.causal_mask(jnp.ones((b, t), bool))
    want = A.attention(q, k, v, mask, "dense")
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = A.attention(*bf, mask, "chunked", 4)
    assert got.dtype == jnp.bfloat16
    _close(got, want, 3e-2)


def test_chunked_memory_stays_linear_in_length_under_a_differentiated_scan():
    """The layers run under a differentiated lax.scan with the masks loop-invariant. Without the
    barrier in `_flash_fwd`, JAX's partial evaluation precomputed the mask-only work of every
    (query block, key block) pair and kept it as residuals: O(T^2) memory (241 MiB per row at
    T=2048 here, against 20 outside a scan). The gradient's temporaries must stay ~linear in T."""
    h, kv, d, block = 4, 2, 64, 256

    def temp_bytes(t):
        q = jax.ShapeDtypeStruct((2, t, h, d), jnp.float32)
        k = jax.ShapeDtypeStruct((2, kv, t, d), jnp.float32)

        def loss(q, k, v):
            mask = models.causal_mask(jnp.ones((2, t), bool))
            layer = lambda x, _: (A.attention(x, k, v, mask, "chunked", block), None)  # noqa: E731
            return jnp.sum(jax.lax.scan(layer, q, None, length=2)[0] ** 2)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(q, k, k).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(1024), temp_bytes(2048)
    assert large < 2.6 * small, (small, large)  # linear: ~2x; quadratic: ~4x


# ---------------------------------------------------------------------------- splash (interpret)
def _at(own_BxT, o_BxTxHxD):
    return jnp.where(own_BxT[:, :, None, None], o_BxTxHxD, 0)


@pytest.mark.parametrize("groups", [1, 2])
def test_splash_interpret_equals_dense_on_queries_at_valid_slots(groups):
    """Splash's pad queries attend to pad keys (finite, unread); every query at a valid slot and
    every gradient with the loss on those queries equal the dense path. Causal T = S (padded to
    128 inside) and the shared-prompt offset."""
    b, p, n, kv, d = 3, 5, 9, 1, 16
    valid = jnp.concatenate([_padded_valid(b, p), jnp.ones((b, n), bool).at[1, 6:].set(False)], 1)
    valid = valid.at[2, p:].set(True)  # a row with an all-padding prompt
    for mask in (models.causal_mask(valid), models.causal_mask(valid).queries_from(p)):
        t, s = mask.q_slot.shape[1], p + n
        q, k, v = _qkv(b, t, s, kv * groups, kv, d, seed=t)
        own = jnp.take_along_axis(mask.kv_valid, mask.q_slot, axis=1)  # the query's own slot
        want = _value_and_grads("dense", q, k, v, mask, weight=own)
        got = _value_and_grads("splash_interpret", q, k, v, mask, weight=own)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got))
        _close(_at(own, got[0]), _at(own, want[0]))
        _close(got[1], want[1], 5e-5)


def test_splash_on_a_mesh_runs_in_shard_map():
    b, t, kv, g, d = 4, 9, 2, 2, 16
    q, k, v = _qkv(b, t, t, kv * g, kv, d, seed=11)
    mask = models.causal_mask(jnp.ones((b, t), bool).at[0, :3].set(False))
    own = mask.kv_valid
    want = _value_and_grads("dense", q, k, v, mask, weight=own)
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh):
        got = _value_and_grads("splash_interpret", q, k, v, mask, weight=own)
    _close(_at(own, got[0]), _at(own, want[0]))
    _close(got[1], want[1], 5e-5)


def test_splash_falls_back_where_it_cannot_express_the_mask():
    b, s, h, d = 2, 6, 2, 8
    q, k, v = _qkv(b, 1, s, h, 1, d)
    mask = models.decode_mask(jnp.ones((b, s), bool), jnp.array([2, 5]))
    assert not A.splash_supports(mask)
    _close(A.attention(q, k, v, mask, "splash_interpret"), A.attention(q, k, v, mask, "dense"))
    with pytest.raises(ValueError, match="static offset"):
        A.splash_attention(q, k, v, mask, interpret=True)


# ---------------------------------------------------------------------------- dispatch, bad input
def test_default_implementation_and_bad_input():
    assert A.default_implementation(1, 4096) == "dense"  # a decode step
    assert A.default_implementation(300, 300) == "dense"  # one block
    assert A.default_implementation(600, 600) == "chunked"  # CPU
    assert A.default_implementation(9, 9, block=4) == "chunked"
    q, k, v = _qkv(2, 3, 3, 2, 1, 8)
    mask = models.causal_mask(jnp.ones((2, 3), bool))
    with pytest.raises(ValueError, match="needs a GPU"):
        A.attention(q, k, v, mask, "cudnn")
    with pytest.raises(ValueError, match="implementation must be one of"):
        A.attention(q, k, v, mask, "flash")
    with pytest.raises(ValueError, match="do not match"):
        A.attention(q, k, v, models.causal_mask(jnp.ones((2, 4), bool)), "dense")
    with pytest.raises(TypeError, match="AttentionMask"):
        A.attention(q, k, v, mask.dense(), "dense")
    with pytest.raises(ValueError, match="block must be a positive int"):
        A.chunked_attention(q, k, v, mask, 0)
    with pytest.raises(ValueError, match="attention_impl"):
        ModelConfig(attention_impl="flash")
    with pytest.raises(ValueError, match="attention_block"):
        ModelConfig(attention_block=0)


# ---------------------------------------------------------------------------- in the model
def _tiny(**kw):
    return models.preset("tiny", vocab_size=64, num_layers=2, hidden_size=32, intermediate_size=64,
                         num_heads=4, num_kv_heads=2, head_dim=8, **kw)  # fmt: skip


def test_model_chunked_equals_dense_with_the_shared_prompt_layout():
    """`steps.response_hidden` with G prompts for R = 2G responses (the cached response pass at
    offset P) and its gradient: chunked blocks of 3 equal the dense path."""
    rng = np.random.default_rng(0)
    g, k, p, n = 2, 2, 5, 7
    prompt = jnp.asarray(rng.integers(1, 64, (g, p)), jnp.int32)
    prompt_valid = jnp.ones((g, p), bool).at[0, :2].set(False)
    response = jnp.asarray(rng.integers(1, 64, (g * k, n)), jnp.int32)
    response_mask = jnp.ones((g * k, n), bool).at[1, 4:].set(False)

    def run(impl):
        graphdef, params = models.create(_tiny(attention_impl=impl, attention_block=3), seed=0)

        def loss(params):
            from flax import nnx  # noqa: PLC0415

            model = nnx.merge(graphdef, params)
            h = steps.response_hidden(model, prompt, prompt_valid, response, response_mask)
            return jnp.sum(jnp.where(response_mask[..., None], jnp.sin(h), 0)), h

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, h_dense), g_dense = run("dense")
    (_, h_chunk), g_chunk = run("chunked")
    keep = response_mask[..., None]
    _close(jnp.where(keep, h_chunk, 0), jnp.where(keep, h_dense, 0), 1e-5)
    _close(g_chunk, g_dense, 1e-4)
