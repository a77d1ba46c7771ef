"""hybrid_attention (sliding-window softmax + far linear attention) vs the naive reference,
and prefill + token-by-token decode == the full forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear_attention import (
    feature_maps,
    hybrid_attention,
    hybrid_attention_prefill,
    hybrid_attention_step,
    init_hybrid_state,
)
from pallas_kernels.linear_attention import reference as ref


def _inputs(t, *, b=2, h=4, kv=2, d=8, dv=8, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, t, h, d)), dtype)
    k = jnp.asarray(r.normal(size=(b, t, kv, d)), dtype)
    v = jnp.asarray(r.normal(size=(b, t, kv, dv)), dtype)
    log_g = jnp.asarray(-r.uniform(0.0, 0.3, size=(b, t, h)), jnp.float32)
    return q, k, v, feature_maps.softmax_dim(q), feature_maps.softmax_dim(k), log_g


def _close(a, b, tol):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=tol * (1.0 + np.abs(b).max()), rtol=tol)


ALPHA_H = jnp.array([0.5, 1.0, 0.0, 0.25])
BETA_H = jnp.array([0.5, 0.0, 1.0, 2.0])


@pytest.mark.parametrize(
    "t,window,decay",
    [
        (1, 4, True),
        (7, 1, False),
        (7, 3, True),
        (17, 8, True),
        (17, 17, False),
        (40, 64, False),
        pytest.param(40, 11, True, marks=pytest.mark.slow),
    ],
)
def test_xla_values_and_grads_vs_reference(t, window, decay):
    q, k, v, q_lin, k_lin, log_g = _inputs(t)
    log_g = log_g if decay else None
    kw = dict(window=window, alpha=ALPHA_H, beta=BETA_H)
    fast = jax.jit(functools.partial(hybrid_attention, block_size=8, chunk_size=8, **kw))
    slow = functools.partial(ref.hybrid_attention_reference, **kw)
    args = (q, k, v, q_lin, k_lin)
    _close(fast(*args, log_g), slow(*args, log_g=log_g), 1e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.tanh(f(*a)))
    grads = jax.jit(jax.grad(loss(lambda *a: fast(*a, log_g)), argnums=range(5)))(*args)
    grads_ref = jax.jit(jax.grad(loss(lambda *a: slow(*a, log_g=log_g)), argnums=range(5)))(*args)
    for g, g_ref in zip(grads, grads_ref):
        _close(g, g_ref, 1e-4)


def test_log_decay_grad_vs_reference():
    q, k, v, q_lin, k_lin, log_g = _inputs(19)
    kw = dict(window=5)
    f = lambda g: jnp.sum(jnp.tanh(hybrid_attention(q, k, v, q_lin, k_lin, g, chunk_size=8, **kw)))
    f_ref = lambda g: jnp.sum(
        jnp.tanh(ref.hybrid_attention_reference(q, k, v, q_lin, k_lin, log_g=g, **kw))
    )
    _close(jax.jit(jax.grad(f))(log_g), jax.jit(jax.grad(f_ref))(log_g), 1e-4)


def test_bf16():
    args = _inputs(21, dtype=jnp.bfloat16)
    o = hybrid_attention(*args, window=6, block_size=8, chunk_size=8)
    assert o.dtype == jnp.bfloat16
    _close(o, ref.hybrid_attention_reference(*args[:5], window=6, log_g=args[5]), 2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("t,window", [(13, 5), (24, 16)])
def test_pallas_interpret_vs_reference(t, window):
    q, k, v, q_lin, k_lin, log_g = _inputs(t, b=1, h=2, kv=1)
    kw = dict(window=window, alpha=ALPHA_H[:2], beta=BETA_H[:2])
    o = hybrid_attention(
        q, k, v, q_lin, k_lin, log_g, block_size=8, chunk_size=8, implementation="interpret", **kw
    )
    _close(o, ref.hybrid_attention_reference(q, k, v, q_lin, k_lin, log_g=log_g, **kw), 1e-5)
    fn = lambda q: jnp.sum(
        jnp.tanh(hybrid_attention(q, k, v, q_lin, k_lin, log_g, block_size=8,
                                  implementation="interpret", **kw))
    )  # fmt: skip
    fn_ref = lambda q: jnp.sum(
        jnp.tanh(ref.hybrid_attention_reference(q, k, v, q_lin, k_lin, log_g=log_g, **kw))
    )
    _close(jax.grad(fn)(q), jax.grad(fn_ref)(q), 1e-4)


@pytest.mark.parametrize("prefill_len,window", [(0, 4), (1, 4), (3, 4), (4, 4), (9, 4), (6, 1)])
def test_prefill_then_decode_matches_full(prefill_len, window):
    t = 14
    q, k, v, q_lin, k_lin, log_g = _inputs(t)
    kw = dict(window=window, alpha=ALPHA_H, beta=BETA_H)
    o_full = ref.hybrid_attention_reference(q, k, v, q_lin, k_lin, log_g=log_g, **kw)
    if prefill_len:
        cut = lambda x: x[:, :prefill_len]
        o_pre, state = hybrid_attention_prefill(
            *map(cut, (q, k, v, q_lin, k_lin, log_g)), block_size=8, chunk_size=8, **kw
        )
        _close(o_pre, o_full[:, :prefill_len], 1e-5)
    else:
        state = init_hybrid_state(2, window, 4, 2, 8, 8, 8)
    step = jax.jit(functools.partial(hybrid_attention_step, alpha=ALPHA_H, beta=BETA_H))
    for i in range(prefill_len, t):
        o_i, state = step(q[:, i], k[:, i], v[:, i], q_lin[:, i], k_lin[:, i], log_g[:, i], state)
        _close(o_i, o_full[:, i], 1e-5)
    assert state.k_win.shape[1] == window  # constant-size state
    assert int(state.length[0]) == t


def test_bad_inputs_raise():
    q, k, v, q_lin, k_lin, log_g = _inputs(5)
    with pytest.raises(ValueError, match="window"):
        hybrid_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="alpha"):
        hybrid_attention(q, k, v, window=2, alpha=jnp.ones(3))
    with pytest.raises(ValueError, match="linear branch"):
        hybrid_attention(q, k, v, q_lin[..., :4], k_lin, window=2)
    with pytest.raises(ValueError, match="implementation"):
        hybrid_attention(q, k, v, window=2, implementation="flash")
