"""moe_dispatch vs the per-expert dense reference: values and gradients, at odd shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import moe_dispatch as md
from pallas_kernels.moe_dispatch import kernel_gpu, kernel_tpu

TOL = dict(rtol=2e-4, atol=2e-4)
# Pallas interpret paths are slow on CPU: small tiles so odd shapes straddle tile edges.
INTERPRET_TILING = (8, 128, 128)

# (M, group sizes): empty groups, one row, all rows in one group, rows past sum(group_sizes),
# M not a multiple of the tile, groups straddling tiles.
GROUP_CASES = [
    (1, [0, 1, 0]),
    (13, [5, 0, 8]),
    (13, [0, 0, 13]),
    (20, [3, 0, 4, 6]),  # 7 trailing rows in no group
    (24, [0, 0, 0, 0]),
    (29, [9, 9, 2, 9]),
]


def _rand(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, dtype)


def _gpu_interpret_gmm(lhs, rhs, gs, transpose_rhs=False):
    return kernel_gpu.gmm(
        lhs, rhs, gs, transpose_rhs=transpose_rhs, tiling=(16, 16, 16),
        out_dtype=jnp.float32, interpret=True,
    )  # fmt: skip


GMM_BACKENDS = {
    "xla_ragged": functools.partial(md.gmm, implementation="xla_ragged"),
    "xla_blocked": functools.partial(md.gmm, implementation="xla_blocked", tiling=(8, 0, 0)),
    "interpret": functools.partial(md.gmm, implementation="interpret", tiling=INTERPRET_TILING),
    "gpu_interpret": _gpu_interpret_gmm,
}


@pytest.mark.parametrize("backend", list(GMM_BACKENDS))
@pytest.mark.parametrize("m,sizes", GROUP_CASES)
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmm_vs_reference(backend, m, sizes, transpose_rhs):
    k, n, gs = 20, 24, jnp.array(sizes, jnp.int32)
    lhs, rhs = _rand(0, (m, k)), _rand(1, (len(sizes), k, n))
    want = md.gmm_reference(lhs, rhs, gs)
    rhs_in = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    got = GMM_BACKENDS[backend](lhs, rhs_in, gs, transpose_rhs=transpose_rhs)
    np.testing.assert_allclose(got, want, **TOL)
    assert not np.any(np.asarray(got)[int(sum(sizes)) :])  # rows in no group are exactly 0


TGMM_BACKENDS = {
    "xla_ragged": functools.partial(md.tgmm, implementation="xla_ragged"),
    "xla_blocked": functools.partial(md.tgmm, implementation="xla_blocked", tiling=(8, 0, 0)),
    "interpret": functools.partial(md.tgmm, implementation="interpret", tiling=INTERPRET_TILING),
    "gpu_interpret": functools.partial(
        kernel_gpu.tgmm, tiling=(16, 16, 16), out_dtype=jnp.float32, interpret=True
    ),
}


@pytest.mark.parametrize("backend", list(TGMM_BACKENDS))
@pytest.mark.parametrize("m,sizes", GROUP_CASES)
def test_tgmm_vs_reference(backend, m, sizes):
    gs = jnp.array(sizes, jnp.int32)
    lhs, grad = _rand(2, (m, 20)), _rand(3, (m, 24))
    want = md.tgmm_reference(lhs, grad, gs)
    got = TGMM_BACKENDS[backend](lhs, grad, gs)
    np.testing.assert_allclose(got, want, **TOL)
    for e, size in enumerate(sizes):
        if size == 0:
            assert not np.any(np.asarray(got[e]))  # empty groups are written, as zeros


@pytest.mark.parametrize("implementation", ["xla_ragged", "xla_blocked", "interpret"])
@pytest.mark.parametrize("m,sizes", [(13, [5, 0, 8]), (20, [3, 0, 4, 6])])
def test_gmm_grads_vs_reference(implementation, m, sizes):
    gs = jnp.array(sizes, jnp.int32)
    lhs, rhs, cot = _rand(4, (m, 20)), _rand(5, (len(sizes), 20, 24)), _rand(6, (m, 24))

    def loss(fn, lhs, rhs):
        return jnp.sum(fn(lhs, rhs, gs) * cot)

    gmm = functools.partial(md.gmm, implementation=implementation, tiling=INTERPRET_TILING)
    want = jax.grad(functools.partial(loss, md.gmm_reference), argnums=(0, 1))(lhs, rhs)
    got = jax.grad(functools.partial(loss, gmm), argnums=(0, 1))(lhs, rhs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **TOL)


def _moe_problem(t, d, f, e, k, *, ids=None, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (t, d))
    w_gate = jax.random.normal(keys[1], (e, d, f)) / np.sqrt(d)
    w_up = jax.random.normal(keys[2], (e, d, f)) / np.sqrt(d)
    w_down = jax.random.normal(keys[3], (e, f, d)) / np.sqrt(f)
    logits = jax.random.normal(keys[4], (t, e))
    weights, topk_ids, _ = md.route_topk(logits, k)
    if ids is not None:
        topk_ids = jnp.asarray(ids, jnp.int32).reshape(t, k)
    return x, weights, topk_ids, w_gate, w_up, w_down, logits


# (T, E, K, forced ids): one token; T not a multiple of the tile; all tokens to one expert;
# experts 0 and 3 empty.
MOE_CASES = [
    (1, 4, 2, None),
    (13, 5, 2, None),
    (9, 4, 1, [2] * 9),
    (7, 6, 2, [1, 2, 4, 5, 1, 2, 4, 5, 1, 2, 4, 5, 2, 1]),
]


@functools.partial(jax.jit, static_argnums=0)
def _moe_value_and_grads(fn, x, weights, ids, wg, wu, wd):
    """fn(...) and the gradient of <fn(...), cot> wrt x, weights and the expert weights."""
    cot = jax.random.normal(jax.random.key(9), x.shape)

    def loss(x, weights, wg, wu, wd):
        y = fn(x, weights, ids, wg, wu, wd)
        return jnp.sum(y * cot), y

    grads, y = jax.grad(loss, argnums=tuple(range(5)), has_aux=True)(x, weights, wg, wu, wd)
    return y, grads


def _assert_moe_match(ours, ref, args):
    got_y, got = _moe_value_and_grads(ours, *args)
    want_y, want = _moe_value_and_grads(ref, *args)
    np.testing.assert_allclose(got_y, want_y, **TOL)
    for name, g, w in zip(["x", "topk_weights", "w_gate", "w_up", "w_down"], got, want):
        np.testing.assert_allclose(g, w, **TOL, err_msg=name)


def _ours(implementation, capacity_factor=None):
    def fn(x, weights, ids, wg, wu, wd):
        y, _ = md.moe_ffn(
            x, (weights, ids), wg, wu, wd, implementation=implementation,
            capacity_factor=capacity_factor, tiling=INTERPRET_TILING,
        )  # fmt: skip
        return y

    return fn


IMPL_CASES = [("xla", case) for case in MOE_CASES] + [("interpret", MOE_CASES[3])]
IMPL_CASES += [("xla_ragged", MOE_CASES[1])]
IMPL_CASES += [pytest.param("reference", MOE_CASES[3], marks=pytest.mark.slow)]
IMPL_CASES += [pytest.param("interpret", c, marks=pytest.mark.slow) for c in MOE_CASES[:3]]


@pytest.mark.parametrize("implementation,case", IMPL_CASES)
def test_moe_ffn_vs_reference(implementation, case):
    t, e, k, ids = case
    x, weights, topk_ids, wg, wu, wd, _ = _moe_problem(t, 16, 24, e, k, ids=ids)
    args = (x, weights, topk_ids, wg, wu, wd)
    _assert_moe_match(_ours(implementation), md.moe_ffn_reference, args)


def test_moe_ffn_from_router_logits_grads():
    """Router logits in: gradient reaches the router through the top-k weights."""
    x, _, _, wg, wu, wd, logits = _moe_problem(11, 16, 24, 6, 3)

    def ours(logits):
        return jnp.sum(md.moe_ffn(x, logits, wg, wu, wd, top_k=3)[0] ** 2)

    def ref(logits):
        weights, ids, _ = md.route_topk(logits, 3)
        return jnp.sum(md.moe_ffn_reference(x, weights, ids, wg, wu, wd) ** 2)

    got, want = jax.jit(jax.value_and_grad(ours))(logits), jax.jit(jax.value_and_grad(ref))(logits)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], **TOL)
    assert np.any(np.asarray(got[1]))


@pytest.mark.parametrize(
    "implementation,capacity_factor",
    [
        ("xla", 0.5),
        pytest.param("xla", 4.0, marks=pytest.mark.slow),
        pytest.param("interpret", 0.5, marks=pytest.mark.slow),
    ],
)
def test_capacity_drops_latest_tokens(implementation, capacity_factor):
    t, e, k = 10, 4, 2
    # Skewed routing: expert 0 is in every token's top-2, so it overflows at small capacity.
    ids = np.stack([np.zeros(t, np.int32), 1 + np.arange(t) % 3], axis=1)
    x, weights, topk_ids, wg, wu, wd, _ = _moe_problem(t, 16, 24, e, k, ids=ids)
    capacity = md.expert_capacity(t, k, e, capacity_factor)
    _, stats = md.moe_ffn(x, (weights, topk_ids), wg, wu, wd, capacity_factor=capacity_factor)
    counts = np.bincount(ids.reshape(-1), minlength=e)
    np.testing.assert_array_equal(stats.tokens_per_expert_E, counts)
    np.testing.assert_array_equal(stats.kept_per_expert_E, np.minimum(counts, capacity))
    assert int(stats.num_dropped) == int(np.sum(np.maximum(counts - capacity, 0)))
    ref = functools.partial(md.moe_ffn_reference, capacity=capacity)
    args = (x, weights, topk_ids, wg, wu, wd)
    _assert_moe_match(_ours(implementation, capacity_factor), ref, args)


def test_capacity_factor_one_drops_expected_count():
    """Hand count: expert 0 gets all 10 tokens, capacity ceil(1.0 * 10 * 2 / 4) = 5."""
    ids = np.stack([np.zeros(10, np.int32), 1 + np.arange(10) % 3], axis=1)
    x, weights, topk_ids, wg, wu, wd, _ = _moe_problem(10, 16, 24, 4, 2, ids=ids)
    _, stats = md.moe_ffn(x, (weights, topk_ids), wg, wu, wd, capacity_factor=1.0)
    assert int(stats.num_dropped) == 5
    np.testing.assert_array_equal(stats.kept_per_expert_E, [5, 4, 3, 3])


def test_sort_unsort_roundtrip():
    ids = jnp.array([[3, 0], [0, 2], [3, 3], [1, 0]], jnp.int32)
    dispatch = md.sort_tokens(ids, 4)
    np.testing.assert_array_equal(dispatch.group_sizes_E, [3, 1, 1, 3])
    rows = jnp.arange(8, dtype=jnp.float32)[:, None]  # row value = flat assignment index
    sorted_rows = rows[dispatch.order_M]
    np.testing.assert_array_equal(
        jnp.take(ids.reshape(-1), dispatch.order_M), [0, 0, 0, 1, 2, 3, 3, 3]
    )
    np.testing.assert_array_equal(md.unsort(sorted_rows, dispatch)[..., 0], rows.reshape(4, 2))
    np.testing.assert_array_equal(dispatch.token_idx_M, dispatch.order_M // 2)


def test_bad_inputs_raise():
    x, weights, ids, wg, wu, wd, logits = _moe_problem(4, 16, 24, 4, 2)
    with pytest.raises(ValueError, match="implementation"):
        md.gmm(x, wg, jnp.zeros(4, jnp.int32), implementation="cuda")
    with pytest.raises(ValueError, match="group_sizes"):
        md.gmm(x, wg, jnp.zeros(4, jnp.float32))
    with pytest.raises(ValueError, match="rhs"):
        md.gmm(x, wg, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="w_down_ExFxD"):
        md.moe_ffn(x, (weights, ids), wg, wu, wg)
    with pytest.raises(ValueError, match="top_k"):
        md.moe_ffn(x, logits, wg, wu, wd)
    with pytest.raises(ValueError, match="capacity_factor"):
        md.moe_ffn(x, (weights, ids), wg, wu, wd, capacity_factor=0.0)
    with pytest.raises(ValueError, match="x_TxD"):
        md.moe_ffn(x[None], (weights, ids), wg, wu, wd)


@pytest.mark.parametrize("platform,module", [("tpu", kernel_tpu), ("cuda", kernel_gpu)])
def test_kernels_lower_for_accelerators(platform, module):
    """Cross-lowering on CPU runs the Pallas -> Mosaic / Triton lowering at realistic tiles."""
    lhs = jnp.zeros((300, 256), jnp.bfloat16)
    rhs = jnp.zeros((4, 256, 384), jnp.bfloat16)
    gs = jnp.array([100, 0, 150, 50], jnp.int32)
    kw = dict(tiling=None, out_dtype=jnp.bfloat16, interpret=False)
    calls = [
        (functools.partial(module.gmm, transpose_rhs=False, **kw), (lhs, rhs, gs)),
        (
            functools.partial(module.gmm, transpose_rhs=True, **kw),
            (jnp.zeros((300, 384), jnp.bfloat16), rhs, gs),
        ),
        (functools.partial(module.tgmm, **kw), (lhs, jnp.zeros((300, 384), jnp.bfloat16), gs)),
    ]
    for fn, args in calls:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        assert "moe_" in text
