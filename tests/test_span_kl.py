"""span_kl and token_logprobs: every implementation vs the materialising jnp reference."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.span_kl import (
    ROUTE_FKL,
    ROUTE_NONE,
    ROUTE_RKL,
    default_implementation,
    reference,
    span_kl,
    token_logprobs,
)

# Small tiles so that tests cross several token and vocabulary blocks; V = 300 leaves an edge.
BLOCKS = {"xla": (16, 128), "interpret": (16, 128), "pallas_gpu_interpret": (16, 64)}
TOL = {jnp.float32: dict(rtol=2e-4, atol=2e-4), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _routes(kind, num_tokens, key):
    if kind == "none":
        return jnp.zeros((num_tokens,), jnp.int32)
    if kind == "fkl":
        return jnp.full((num_tokens,), ROUTE_FKL, jnp.int32)
    if kind == "rkl":
        return jnp.full((num_tokens,), ROUTE_RKL, jnp.int32)
    return jax.random.randint(key, (num_tokens,), ROUTE_NONE, ROUTE_RKL + 1)


def _inputs(num_tokens, d, num_vocab, dtype, scale=1.0, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    h_s = (scale * jax.random.normal(k[0], (num_tokens, d))).astype(dtype)
    h_t = (scale * jax.random.normal(k[1], (num_tokens, d))).astype(dtype)
    w = (jax.random.normal(k[2], (d, num_vocab)) / np.sqrt(d)).astype(dtype)
    return h_s, h_t, w, k[3]


@functools.partial(jax.jit, static_argnames=("impl", "teacher_kind", "options"))
def _loss_and_grads(h_s, w, route, teacher, *, impl, teacher_kind, options):
    """(kl, (dh, dW)) of sum(kl * c) for a fixed cotangent c; compiled once per shape."""
    c = jnp.linspace(0.5, 1.5, h_s.shape[0])
    kw = dict(options)
    if impl in BLOCKS:
        kw.setdefault("block_t", BLOCKS[impl][0])
        kw.setdefault("block_v", BLOCKS[impl][1])
    kw[teacher_kind] = teacher

    def loss(h, w):
        kl = span_kl(h, w, route, implementation=impl.removesuffix("_interpret"), **kw)
        return jnp.sum(kl * c), kl

    (_, kl), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h_s, w)
    return kl, grads


def _run(impl, h_s, w, route, teacher_kind, teacher, **options):
    ctx = contextlib.nullcontext()
    if impl == "pallas_gpu_interpret":
        from pallas_kernels.span_kl import kernel_gpu

        ctx = kernel_gpu.force_interpret()
    with ctx:
        return _loss_and_grads(
            h_s,
            w,
            route,
            teacher,
            impl=impl,
            teacher_kind=teacher_kind,
            options=tuple(sorted(options.items())),
        )


def _assert_close(got, want, dtype, scale=1.0):
    tol = TOL[dtype]
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    atol = tol["atol"] * max(1.0, float(np.abs(want).max())) * scale
    np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=atol)


def _check_vs_reference(impl, num_tokens, num_vocab, dtype, routes, teacher_kind, scale=1.0, **kw):
    h_s, h_t, w, key = _inputs(num_tokens, 32, num_vocab, dtype, scale)
    route = _routes(routes, num_tokens, key)
    if teacher_kind == "hidden":
        teacher_kind, teacher = "h_teacher_TxD", h_t
    else:
        teacher_kind = "teacher_logits_TxV"
        teacher = jnp.dot(h_t, w, preferred_element_type=jnp.float32)
    kl, grads = _run(impl, h_s, w, route, teacher_kind, teacher, **kw)
    kl_ref, grads_ref = _run("reference", h_s, w, route, teacher_kind, teacher)
    assert kl.shape == (num_tokens,) and kl.dtype == jnp.float32
    assert np.all(np.asarray(kl)[np.asarray(route) == ROUTE_NONE] == 0.0)
    _assert_close(kl, kl_ref, dtype)
    for g, g_ref, x in zip(grads, grads_ref, (h_s, w)):
        assert g.shape == x.shape and g.dtype == x.dtype
        _assert_close(g, g_ref, dtype, scale)
    return kl


@pytest.mark.parametrize("routes", ["none", "fkl", "rkl", "mixed"])
@pytest.mark.parametrize(
    "num_tokens, dtype",
    [(1, jnp.float32), (7, jnp.float32), (45, jnp.float32), (7, jnp.bfloat16), (45, jnp.bfloat16)],
)
def test_xla_vs_reference(num_tokens, dtype, routes):
    _check_vs_reference("xla", num_tokens, 300, dtype, routes, "hidden")


@pytest.mark.parametrize("compact", [True, False])
def test_xla_teacher_logits_and_compaction(compact):
    for routes in ("none", "mixed"):
        _check_vs_reference("xla", 45, 300, jnp.float32, routes, "logits", compact=compact)


# Route kinds are data, not shapes: looping over them reuses one compilation per case.
@pytest.mark.parametrize(
    "num_tokens, dtype, teacher_kind",
    [
        (1, jnp.float32, "hidden"),
        (45, jnp.float32, "hidden"),
        (7, jnp.bfloat16, "hidden"),
        (45, jnp.bfloat16, "logits"),
    ],
)
@pytest.mark.parametrize("impl", ["interpret", "pallas_gpu_interpret"])
def test_pallas_interpret_vs_reference(impl, num_tokens, dtype, teacher_kind):
    for routes in ("none", "fkl", "rkl", "mixed"):
        _check_vs_reference(impl, num_tokens, 300, dtype, routes, teacher_kind)


@pytest.mark.parametrize("impl", ["xla", "interpret", "pallas_gpu_interpret"])
def test_large_logits_no_overflow(impl):
    # Hidden states x100: logits in the hundreds, plain exp would overflow float32.
    kl = _check_vs_reference(impl, 45, 300, jnp.float32, "mixed", "hidden", scale=100.0)
    assert np.all(np.isfinite(np.asarray(kl)))


def test_vocab_smaller_than_block_and_single_column_tail():
    # A 1-column tail block (xla) and V < block_v (Pallas edge block larger than V).
    _check_vs_reference("xla", 9, 129, jnp.float32, "mixed", "hidden")
    _check_vs_reference("pallas_gpu_interpret", 9, 50, jnp.float32, "mixed", "hidden")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_long_sequence(impl):
    _check_vs_reference(impl, 1000, 300, jnp.float32, "mixed", "hidden", block_t=128)


def test_kl_properties():
    h_s, _, w, key = _inputs(45, 32, 300, jnp.float32)
    route = _routes("mixed", 45, key)
    same, (dh, _) = _run("xla", h_s, w, route, "h_teacher_TxD", h_s)
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dh), 0.0, atol=1e-5)  # KL is minimal at p == q
    other, _ = _run("xla", h_s, w, route, "h_teacher_TxD", -h_s)
    assert np.all(np.asarray(other)[np.asarray(route) != 0] > 1e-3)


def test_teacher_gets_no_gradient():
    h_s, h_t, w, key = _inputs(8, 32, 300, jnp.float32)
    route = _routes("mixed", 8, key)
    f = lambda h_t: jnp.sum(span_kl(h_s, w, route, h_teacher_TxD=h_t, implementation="xla"))
    assert np.all(np.asarray(jax.grad(f)(h_t)) == 0.0)


def test_jit_and_default_implementation():
    assert default_implementation() == (
        "xla" if jax.default_backend() == "cpu" else default_implementation()
    )
    h_s, h_t, w, key = _inputs(7, 32, 300, jnp.float32)
    route = _routes("mixed", 7, key)
    got = jax.jit(lambda *a: span_kl(*a, h_teacher_TxD=h_t))(h_s, w, route)
    want = reference.span_kl(h_s, w, route, h_teacher_TxD=h_t)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(route_T=jnp.zeros((5,), jnp.int32)), "route_T"),
        (dict(route_T=jnp.zeros((7,), jnp.float32)), "route_T"),
        (dict(w_DxV=jnp.zeros((31, 300))), "w_DxV"),
        (dict(h_teacher_TxD=None), "exactly one"),
        (dict(h_teacher_TxD=jnp.zeros((7, 31))), "h_teacher_TxD"),
        (dict(h_teacher_TxD=None, teacher_logits_TxV=jnp.zeros((7, 299))), "teacher_logits_TxV"),
        (dict(implementation="cuda"), "implementation"),
        (dict(block_v=0), "block_v"),
        (dict(implementation="interpret", block_v=100), "block_v"),
    ],
)
def test_span_kl_bad_inputs(kwargs, match):
    h_s, h_t, w, _ = _inputs(7, 32, 300, jnp.float32)
    args = (
        dict(h_student_TxD=h_s, w_DxV=w, route_T=jnp.zeros((7,), jnp.int32), h_teacher_TxD=h_t)
        | kwargs
    )
    with pytest.raises(ValueError, match=match):
        span_kl(args.pop("h_student_TxD"), args.pop("w_DxV"), args.pop("route_T"), **args)


# ------------------------------------------------------------------------ token_logprobs


def _logp_loss(impl, h, w, targets, **kw):
    logp, entropy = token_logprobs(h, w, targets, implementation=impl, **kw)
    c = jnp.linspace(0.5, 1.5, h.shape[0])
    return jnp.sum(logp * c) - 0.3 * jnp.sum(entropy * c[::-1]), (logp, entropy)


@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("num_tokens", [1, 45])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_logprobs_vs_reference(num_tokens, dtype, scale):
    h, _, w, key = _inputs(num_tokens, 32, 300, dtype, scale)
    targets = jax.random.randint(key, (num_tokens,), 0, 300)
    vg = jax.jit(
        jax.value_and_grad(_logp_loss, argnums=(1, 2), has_aux=True),
        static_argnums=0,
        static_argnames=("block_t", "block_v"),
    )
    (_, got), grads = vg("xla", h, w, targets, block_t=16, block_v=128)
    (_, want), grads_ref = vg("reference", h, w, targets)
    for a, b in zip(got, want):
        assert a.shape == (num_tokens,) and a.dtype == jnp.float32
        _assert_close(a, b, dtype)
    for g, g_ref in zip(grads, grads_ref):
        _assert_close(g, g_ref, dtype, scale)


def test_token_logprobs_bad_inputs():
    h, _, w, _ = _inputs(7, 32, 300, jnp.float32)
    with pytest.raises(ValueError, match="targets_T"):
        token_logprobs(h, w, jnp.zeros((6,), jnp.int32))
    with pytest.raises(ValueError, match="h_TxD"):
        token_logprobs(h[0], w, jnp.zeros((7,), jnp.int32))
