"""MoE router losses and metrics: hand-computed values and Hugging Face Qwen3-MoE parity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrace.losses import moe

LOG_1234 = jnp.log(jnp.array([[1.0, 2.0, 3.0, 4.0]]))  # softmax -> [.1, .2, .3, .4]


def test_router_topk_by_hand():
    weights, ids, probs = moe.router_topk(LOG_1234, 2, norm_topk_prob=True)
    np.testing.assert_allclose(probs, [[0.1, 0.2, 0.3, 0.4]], rtol=1e-6)
    np.testing.assert_array_equal(ids, [[3, 2]])
    np.testing.assert_allclose(weights, [[4 / 7, 3 / 7]], rtol=1e-6)
    weights, _, _ = moe.router_topk(LOG_1234, 2, norm_topk_prob=False)
    np.testing.assert_allclose(weights, [[0.4, 0.3]], rtol=1e-6)


def test_selection_bias_changes_choice_not_weights():
    bias = jnp.array([1.0, 0.0, 0.0, 0.0])  # 0.1 + 1.0 beats 0.4
    weights, ids, _ = moe.router_topk(LOG_1234, 2, norm_topk_prob=False, selection_bias_E=bias)
    np.testing.assert_array_equal(ids, [[0, 3]])
    np.testing.assert_allclose(weights, [[0.1, 0.4]], rtol=1e-6)  # unbiased probabilities
    grad = jax.grad(lambda b: jnp.sum(moe.router_topk(LOG_1234, 2, selection_bias_E=b)[0]))(bias)
    assert not np.any(np.asarray(grad))


def test_sigmoid_scores():
    weights, ids, scores = moe.router_topk(jnp.array([[0.0, 2.0, -1.0]]), 1, score_fn="sigmoid")
    np.testing.assert_allclose(scores, jax.nn.sigmoid(jnp.array([[0.0, 2.0, -1.0]])), rtol=1e-6)
    np.testing.assert_array_equal(ids, [[1]])
    np.testing.assert_allclose(weights, [[1.0]])


def test_expert_counts_with_mask():
    ids = jnp.array([[0, 1], [1, 2], [1, 0]])
    np.testing.assert_array_equal(moe.expert_counts(ids, 4), [2, 3, 1, 0])
    np.testing.assert_array_equal(moe.expert_counts(ids, 4, jnp.array([1, 0, 1])), [2, 2, 0, 0])


def test_load_balancing_loss_by_hand():
    # Both tokens pick expert 0 (p = [.75, .25]): f = [1, 0], p = [.75, .25] -> 2 * .75 = 1.5.
    logits = jnp.log(jnp.array([[0.75, 0.25], [0.75, 0.25]]))
    np.testing.assert_allclose(moe.load_balancing_loss(logits, 1), 1.5, rtol=1e-6)
    # Uniform probabilities give exactly K, whichever experts the ties pick.
    np.testing.assert_allclose(moe.load_balancing_loss(jnp.zeros((4, 4)), 2), 2.0, rtol=1e-6)
    # The padded token (to expert 1 with p=.9) must not count.
    logits = jnp.log(jnp.array([[0.75, 0.25], [0.1, 0.9]]))
    loss = moe.load_balancing_loss(logits, 1, mask_T=jnp.array([1, 0]))
    np.testing.assert_allclose(loss, 1.5, rtol=1e-6)


def test_global_lbl_equals_local_on_one_batch():
    logits = jax.random.normal(jax.random.key(0), (3, 7, 8))  # [L, T, E]
    mask = jnp.array([1, 1, 0, 1, 1, 1, 0])
    _, ids, _ = moe.router_topk(logits.reshape(-1, 8), 2)
    counts = moe.expert_counts(ids, 8, jnp.tile(mask, 3))
    np.testing.assert_allclose(
        moe.global_load_balancing_loss(logits, counts, 2, mask_T=mask),
        moe.load_balancing_loss(logits, 2, mask_T=mask),
        rtol=1e-6,
    )


def test_global_lbl_psums_counts_over_data_parallel_axis():
    # Device 0 routes everything to expert 0, device 1 to expert 1: locally maximal imbalance,
    # globally balanced, f = [.5, .5] -> loss = 2 * (.5 p0 + .5 p1) = 1 on each device.
    logits_2xTxE = jnp.log(jnp.array([[[0.9, 0.1]] * 3, [[0.2, 0.8]] * 3]))
    counts_2xE = jnp.array([[3.0, 0.0], [0.0, 3.0]])
    fn = functools.partial(moe.global_load_balancing_loss, top_k=1, axis_name="data")
    losses = jax.vmap(fn, axis_name="data")(logits_2xTxE, counts_2xE)
    np.testing.assert_allclose(losses, [1.0, 1.0], rtol=1e-6)
    local = jax.vmap(functools.partial(moe.load_balancing_loss, top_k=1))(logits_2xTxE)
    np.testing.assert_allclose(local, [1.8, 1.6], rtol=1e-6)
    # The gradient reaches the local probabilities only, weighted by the global f.
    grad = jax.grad(lambda lg: moe.global_load_balancing_loss(lg, jnp.array([3.0, 1.0]), 1))(
        logits_2xTxE[0]
    )
    p = 0.9  # d/dz0 of 2 * (.75 p0 + .25 p1) per token / T, p0 = sigma(z0 - z1)
    np.testing.assert_allclose(grad[:, 0], [2 * 0.5 * p * (1 - p) / 3] * 3, rtol=1e-5)


def test_router_z_loss_by_hand():
    logits = jnp.zeros((2, 4))
    np.testing.assert_allclose(moe.router_z_loss(logits), np.log(4.0) ** 2, rtol=1e-6)
    logits = jnp.array([[0.0, 0.0], [5.0, -2.0]])
    lse = np.log(np.exp(5.0) + np.exp(-2.0))
    np.testing.assert_allclose(moe.router_z_loss(logits), (np.log(2.0) ** 2 + lse**2) / 2, 1e-6)
    z = moe.router_z_loss(logits, mask_T=jnp.array([0, 1]))
    np.testing.assert_allclose(z, lse**2, rtol=1e-6)


def test_aux_free_bias_update_by_hand():
    bias = jnp.array([0.5, 0.0, -0.1, 0.0])
    new = moe.aux_free_bias_update(bias, jnp.array([10.0, 2.0, 6.0, 6.0]), 0.01)
    np.testing.assert_allclose(new, [0.49, 0.01, -0.1, 0.0], rtol=1e-6)
    # Per layer [L, E], counts summed over a data-parallel axis of two devices first.
    counts = jnp.array([[[1.0, 3.0]], [[1.0, 0.0]]])  # device totals: [2, 3]
    fn = functools.partial(moe.aux_free_bias_update, rate=0.1, axis_name="data")
    new = jax.vmap(fn, axis_name="data")(jnp.zeros((2, 1, 2)), counts)
    np.testing.assert_allclose(new, [[[0.1, -0.1]], [[0.1, -0.1]]], rtol=1e-6)


def test_expert_load_metrics_by_hand():
    metrics = moe.expert_load_metrics(jnp.array([[2.0, 4.0, 6.0], [3.0, 3.0, 3.0]]))
    np.testing.assert_allclose(metrics["max_over_mean"], [1.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(metrics["min_over_mean"], [0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(metrics["max_violation"], [0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(metrics["cv"], [np.std([2, 4, 6]) / 4, 0.0], atol=1e-6)
    np.testing.assert_allclose(metrics["load"][0], [2 / 12, 4 / 12, 6 / 12], rtol=1e-6)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="top_k"):
        moe.router_topk(LOG_1234, 5)
    with pytest.raises(ValueError, match="selection_bias_E"):
        moe.router_topk(LOG_1234, 2, selection_bias_E=jnp.zeros(3))
    with pytest.raises(ValueError, match="mask_T"):
        moe.load_balancing_loss(LOG_1234, 1, mask_T=jnp.ones(2))
    with pytest.raises(ValueError, match="counts_E"):
        moe.global_load_balancing_loss(LOG_1234, jnp.ones(3), 1)
    with pytest.raises(ValueError, match="router_logits"):
        moe.router_z_loss(jnp.zeros(4))
    with pytest.raises(ValueError, match="bias_E"):
        moe.aux_free_bias_update(jnp.zeros(4), jnp.zeros(3), 0.1)


# --- Hugging Face parity (torch CPU) --------------------------------------------------------


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_matches_hf_qwen3_moe(norm_topk_prob):
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    config = hf.Qwen3MoeConfig(
        hidden_size=16, num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm_topk_prob
    )
    router = hf.Qwen3MoeTopKRouter(config)
    torch.manual_seed(0)
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(11, 16)
    with torch.no_grad():
        logits, scores, indices = router(hidden)
    weights, ids, _ = moe.router_topk(jnp.asarray(logits.numpy()), 3, norm_topk_prob=norm_topk_prob)
    np.testing.assert_array_equal(ids, indices.numpy())
    np.testing.assert_allclose(weights, scores.numpy(), rtol=1e-6)


@pytest.mark.parametrize("with_mask", [False, True])
def test_load_balancing_loss_matches_hf(with_mask):
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    batch, seq, layers, experts, top_k = 2, 5, 3, 8, 2
    logits = np.random.default_rng(0).normal(size=(layers, batch * seq, experts)).astype("f4")
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], "i4") if with_mask else None
    want = hf.load_balancing_loss_func(
        tuple(torch.from_numpy(layer) for layer in logits),
        experts,
        top_k,
        None if mask is None else torch.from_numpy(mask),
    )
    mask_T = None if mask is None else jnp.asarray(mask.reshape(-1))
    got = moe.load_balancing_loss(jnp.asarray(logits), top_k, mask_T=mask_T)
    np.testing.assert_allclose(got, float(want), rtol=1e-5)
