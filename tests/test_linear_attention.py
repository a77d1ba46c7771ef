"""linear_attention vs the naive O(T^2) reference and the token-by-token recurrence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear_attention import (
    feature_maps,
    kernel_gpu,
    linear_attention,
    linear_attention_step,
)
from pallas_kernels.linear_attention import reference as ref

CHUNK = 16


def _inputs(t, *, b=2, h=4, kv=2, dk=8, dv=16, dtype=jnp.float32, decay=True, init=True, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, t, h, dk)) * 0.5, dtype)
    k = jnp.asarray(r.normal(size=(b, t, kv, dk)) * 0.5, dtype)
    v = jnp.asarray(r.normal(size=(b, t, kv, dv)), dtype)
    log_g = jnp.asarray(-r.uniform(0.0, 0.7, size=(b, t, h)), jnp.float32) if decay else None
    s0 = jnp.asarray(r.normal(size=(b, h, dk, dv)), jnp.float32) if init else None
    return q, k, v, log_g, s0


def _loss(fn):
    """A scalar that weights every output and the final state differently."""

    def loss(q, k, v, log_g, s0):
        o, state = fn(q, k, v, log_g, s0)
        o = o.astype(jnp.float32)
        return jnp.sum(o * jnp.sin(o)) + 0.1 * jnp.sum(state * jnp.cos(state))

    return loss


def _close(a, b, tol):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=tol * (1.0 + np.abs(b).max()), rtol=tol)


@pytest.mark.parametrize("t", [1, 7, CHUNK + 1, pytest.param(100, marks=pytest.mark.slow)])
@pytest.mark.parametrize("decay", [True, False])
def test_values_and_grads_vs_reference(t, decay):
    args = _inputs(t, decay=decay, init=decay)
    impl = jax.jit(functools.partial(linear_attention, chunk_size=CHUNK, implementation="xla"))
    o, s = impl(*args)
    o_ref, s_ref = ref.linear_attention_reference(*args)
    _close(o, o_ref, 1e-5)
    _close(s, s_ref, 1e-5)
    # The token-by-token recurrence is a second, independent definition of the same thing.
    o_rec, s_rec = ref.linear_attention_recurrent(*args)
    _close(o, o_rec, 1e-5)
    _close(s, s_rec, 1e-5)
    diff = [i for i, a in enumerate(args) if a is not None]
    grad = lambda f: jax.jit(jax.grad(_loss(f), argnums=diff))(*args)
    for g, g_ref in zip(grad(impl), grad(ref.linear_attention_reference)):
        _close(g, g_ref, 1e-4)


def test_bf16_inputs(t=33):
    args = _inputs(t, dtype=jnp.bfloat16)
    impl = jax.jit(functools.partial(linear_attention, chunk_size=CHUNK))
    o, s = impl(*args)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    o_ref, s_ref = ref.linear_attention_reference(*args)
    _close(o, o_ref, 2e-2)
    _close(s, s_ref, 1e-4)
    grads = jax.jit(jax.grad(_loss(impl), argnums=(0, 1, 2, 3)))(*args)
    grads_ref = jax.jit(jax.grad(_loss(ref.linear_attention_reference), argnums=(0, 1, 2, 3)))(
        *args
    )
    for g, g_ref, a in zip(grads, grads_ref, args):
        assert g.dtype == a.dtype
        _close(g, g_ref, 5e-2)


def test_chunk_size_does_not_change_result():
    args = _inputs(45)
    outs = [jax.jit(functools.partial(linear_attention, chunk_size=c))(*args) for c in (1, 8, 64)]
    for o, s in outs[1:]:
        _close(o, outs[0][0], 1e-5)
        _close(s, outs[0][1], 1e-5)


def test_strong_decay_stays_finite():
    """log_g of -30 per token underflows exp(B) within a chunk; nothing may turn into NaN."""
    q, k, v, _, s0 = _inputs(40)
    log_g = jnp.full(q.shape[:3], -30.0)
    o, s = linear_attention(q, k, v, log_g, s0, chunk_size=CHUNK)
    o_ref, s_ref = ref.linear_attention_recurrent(q, k, v, log_g, s0)
    _close(o, o_ref, 1e-5)
    fn = functools.partial(linear_attention, chunk_size=CHUNK)
    grads = jax.jit(jax.grad(_loss(fn), (0, 3)))(q, k, v, log_g, s0)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_prefill_then_decode_steps_match_full():
    q, k, v, log_g, _ = _inputs(23)
    o_full, s_full = linear_attention(q, k, v, log_g, chunk_size=CHUNK)
    _, state = linear_attention(q[:, :10], k[:, :10], v[:, :10], log_g[:, :10], chunk_size=8)
    step = jax.jit(linear_attention_step)
    for i in range(10, 23):
        o_i, state = step(q[:, i], k[:, i], v[:, i], log_g[:, i], state)
        _close(o_i, o_full[:, i], 1e-5)
    _close(state, s_full, 1e-5)


@pytest.mark.slow
def test_pallas_tpu_kernel_interpret(t=21):
    args = _inputs(t, b=1, h=2, kv=1)
    o, s = linear_attention(*args, chunk_size=8, implementation="interpret")
    o_ref, s_ref = ref.linear_attention_reference(*args)
    _close(o, o_ref, 1e-5)
    _close(s, s_ref, 1e-5)
    fn = functools.partial(linear_attention, chunk_size=8, implementation="interpret")
    grads = jax.grad(_loss(fn), argnums=(0, 3))(*args)
    grads_ref = jax.grad(_loss(ref.linear_attention_reference), argnums=(0, 3))(*args)
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref, 1e-4)


@pytest.mark.slow
def test_pallas_gpu_kernel_body_interpret():
    """The Triton kernel's body, run by the Pallas interpreter on CPU."""
    g, t, dk, dv, c = 3, 24, 8, 16, 8
    r = np.random.default_rng(1)
    q, k = (jnp.asarray(r.normal(size=(g, t, dk)), jnp.float32) for _ in range(2))
    v = jnp.asarray(r.normal(size=(g, t, dv)), jnp.float32)
    log_g = jnp.asarray(-r.uniform(0, 0.5, size=(g, t)), jnp.float32)
    s0 = jnp.asarray(r.normal(size=(g, dk, dv)), jnp.float32)
    b = jnp.cumsum(log_g.reshape(g, t // c, c), -1).reshape(g, t)
    o, s = kernel_gpu.forward(q, k, v, b, s0, chunk=c, interpret=True)
    # Reference in [B=g, T, H=1, D] layout.
    o_ref, s_ref = ref.linear_attention_reference(
        q[:, :, None], k[:, :, None], v[:, :, None], log_g[:, :, None], s0[:, None]
    )
    _close(o, o_ref[:, :, 0], 1e-5)
    _close(s, s_ref[:, 0], 1e-5)


@pytest.mark.parametrize("name", sorted(feature_maps.FEATURE_MAPS))
def test_feature_maps_nonnegative(name):
    x = jnp.linspace(-4.0, 4.0, 24).reshape(1, 2, 3, 4)
    phi = feature_maps.get(name)(x)
    assert bool(jnp.all(phi >= 0))
    if name.startswith("softmax"):
        _close(phi.sum(-1), jnp.ones(phi.shape[:-1]), 1e-6)
    if name == "elu_plus_one":
        _close(phi, jnp.where(x > 0, x + 1, jnp.exp(x)), 1e-6)


def test_bad_inputs_raise():
    q, k, v, log_g, s0 = _inputs(5)
    with pytest.raises(ValueError, match="k heads"):
        linear_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match="log_g"):
        linear_attention(q, k, v, log_g[:, :4])
    with pytest.raises(ValueError, match="initial_state"):
        linear_attention(q, k, v, log_g, s0[:, :1])
    with pytest.raises(ValueError, match="implementation"):
        linear_attention(q, k, v, implementation="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="feature map"):
        feature_maps.get("cosine")
