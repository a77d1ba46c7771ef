"""PPO mini-batch updates: several optimizer updates per rollout batch against a hand-written
loop of plain-jnp updates, the on-policy first update against today's step, live clipping, and
the reference log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrace import losses, models, rl, steps
from tests.test_sharding import CFG

G, K, P, N = 4, 3, 5, 6  # 4 groups of 3 responses; 2 mini-batches take 2 whole groups each


def _batch(seed=0):
    """Full prompts (no left padding, so the plain-logits reference needs no positions) and
    right-padded responses of different lengths, one of them empty."""
    rng = np.random.default_rng(seed)
    lengths = np.resize([N, 4, 1, N, 3, 0, 5], G * K)
    mask = np.arange(N)[None, :] < lengths[:, None]
    return {
        "prompt": rng.integers(1, CFG.vocab_size, (G, P)).astype(np.int32),
        "prompt_valid": np.ones((G, P), bool),
        "response": np.where(mask, rng.integers(1, CFG.vocab_size, (G * K, N)), 0).astype(np.int32),
        "response_mask": mask,
        "advantages": rng.choice([-1.5, -0.5, 0.7, 1.2], G * K).astype(np.float32),
        "route": np.where(mask, 0, -1).astype(np.int32),
    }


def _logp_reference(graphdef, params, batch):
    """log p(response token) [R, N] from full-sequence logits (no KV cache, no span_kl op)."""
    prompt = np.repeat(batch["prompt"], K, axis=0)
    tokens = jnp.concatenate([prompt, batch["response"]], axis=1)
    logits = models.forward_logits(graphdef, params, tokens)[:, P - 1 : P - 1 + N]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch["response"][..., None], -1)[
        ..., 0
    ]
    return jnp.where(batch["response_mask"], logp, 0.0)


def _setup(optimizer, cfg):
    graphdef, params = models.create(CFG, 0)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
    return graphdef, params, state, steps.make_rl_step(graphdef, optimizer, cfg)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _close_trees(got, want, rtol=1e-4):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        scale = max(float(np.max(np.abs(b))), 1e-6)
        err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        assert err <= rtol * scale, f"{jax.tree_util.keystr(path)}: {err} vs {scale}"


@pytest.mark.parametrize("num_minibatches, epochs", [(2, 2), (4, 1)])
def test_minibatch_updates_equal_a_hand_written_loop(num_minibatches, epochs):
    cfg = steps.LossConfig(mode="grpo", eps_low=0.2, eps_high=0.28, norm="token")
    opt = optax.sgd(1.0)  # large enough that later updates see ratios far from 1
    graphdef, params, state, rl_step = _setup(opt, cfg)
    batch = _batch()

    # The reference: old log-probs once from the initial params, then epochs x mini-batches
    # of value_and_grad + optax on the plain clipped surrogate of each mini-batch.
    ref_params, ref_opt = _copy(params), opt.init(params)
    old = _logp_reference(graphdef, params, batch)
    rows_per, groups_per = G * K // num_minibatches, G // num_minibatches
    clip_fracs = []
    for _ in range(epochs):
        for i in range(num_minibatches):
            rows = slice(i * rows_per, (i + 1) * rows_per)
            mb = {
                **{k: batch[k][rows] for k in ("response", "response_mask")},
                "prompt": batch["prompt"][i * groups_per : (i + 1) * groups_per],
            }

            def loss_fn(p, mb=mb, rows=rows):
                logp = _logp_reference(graphdef, p, mb)
                return losses.policy_gradient_loss(
                    logp,
                    old[rows],
                    batch["advantages"][rows],
                    mb["response_mask"],
                    eps_low=0.2,
                    eps_high=0.28,
                    norm="token",
                )

            (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(ref_params)
            clip_fracs.append(float(m["clip_frac"]))
            updates, ref_opt = opt.update(grads, ref_opt, ref_params)
            ref_params = optax.apply_updates(ref_params, updates)

    mbs = rl.minibatches(batch, num_minibatches)
    mbs = rl.add_behaviour_stats(mbs, state["params"], logprob_fn=steps.make_logprob_fn(graphdef))
    state, m = rl.ppo_updates(state, mbs, rl_step, jnp.float32(0.0), False, epochs=epochs)
    assert int(state["step"]) == 1  # one rollout batch, however many updates
    assert m["updates"] == num_minibatches * epochs and m["skipped_updates"] == 0
    assert m["finite"] == 1.0
    np.testing.assert_allclose(m["clip_frac"], np.mean(clip_fracs), atol=1e-6)
    assert clip_fracs[0] == 0 and max(clip_fracs) > 0  # on-policy first, then really clipping
    _close_trees(state["params"], ref_params)


def test_on_policy_first_update_equals_todays_step():
    cfg = steps.LossConfig(mode="grpo")
    opt = optax.sgd(0.5)
    graphdef, params, state, rl_step = _setup(opt, cfg)
    batch = _batch(1)
    twin = jax.tree.map(jnp.copy, state)
    (mb,) = rl.add_behaviour_stats(
        rl.minibatches(batch, 1), state["params"], logprob_fn=steps.make_logprob_fn(graphdef)
    )
    np.testing.assert_allclose(mb["old_logp"], _logp_reference(graphdef, params, batch), atol=1e-5)
    new, m_new = rl_step(state, mb, jnp.float32(0.0), False)
    today, m_today = rl_step(twin, batch, jnp.float32(0.0), False)
    for key in ("loss", "grad_norm", "entropy"):
        np.testing.assert_allclose(m_new[key], m_today[key], rtol=1e-5)
    np.testing.assert_allclose(m_new["ratio_mean"], 1.0, atol=1e-5)
    assert float(m_new["clip_frac"]) == 0.0
    _close_trees(new["params"], today["params"], 1e-5)


def test_clipping_engages_outside_both_bounds():
    """Old log-probs shifted so every ratio is 2 where A > 0 and 0.5 where A < 0: every token is
    clipped (high or low), so the surrogate has no gradient at all."""
    cfg = steps.LossConfig(mode="grpo", eps_low=0.2, eps_high=0.28)
    opt = optax.sgd(1.0)
    graphdef, params, state, rl_step = _setup(opt, cfg)
    batch = _batch(2)
    logp = steps.make_logprob_fn(graphdef)(params, batch)
    pos = batch["advantages"] > 0
    shift = np.where(pos, np.log(2.0), -np.log(2.0))[:, None]
    batch["old_logp"] = np.where(batch["response_mask"], logp - shift, 0.0).astype(np.float32)
    mask = batch["response_mask"]
    _, m = rl_step(state, batch, jnp.float32(0.0), False)
    n = mask.sum()
    np.testing.assert_allclose(m["clip_frac_high"], mask[pos].sum() / n, atol=1e-6)
    np.testing.assert_allclose(m["clip_frac_low"], mask[~pos].sum() / n, atol=1e-6)
    assert 0 < float(m["clip_frac_high"]) < 1 and 0 < float(m["clip_frac_low"]) < 1
    k3 = lambda r: r - 1 - np.log(r)  # the approximate KL to the behaviour policy, per token
    want_kl = (mask[pos].sum() * k3(2.0) + mask[~pos].sum() * k3(0.5)) / n
    np.testing.assert_allclose(m["approx_kl"], want_kl, rtol=1e-4)
    np.testing.assert_allclose(
        m["ratio_mean"], (mask[pos].sum() * 2 + mask[~pos].sum() * 0.5) / n, rtol=1e-4
    )
    assert float(m["grad_norm"]) == 0.0


def test_ref_logp_feeds_the_reference_kl():
    cfg = steps.LossConfig(mode="grpo", ref_kl_coef=0.04, ref_kl_estimator="k1")
    opt = optax.sgd(0.1)
    graphdef, params, state, rl_step = _setup(opt, cfg)
    batch = _batch(3)
    _, other = models.create(CFG, 1)  # a reference that differs from the policy
    logprob = steps.make_logprob_fn(graphdef)
    (mb,) = rl.add_behaviour_stats(
        rl.minibatches(batch, 1), params, logprob_fn=logprob, old_logp=False, ref_params=other
    )
    assert "old_logp" not in mb
    mask = batch["response_mask"]
    want = (logprob(params, batch) - logprob(other, batch))[mask].mean()  # k1 = logp - ref
    _, m = rl_step(state, mb, jnp.float32(0.0), False)
    np.testing.assert_allclose(m["ref_kl"], want, rtol=1e-4)
    with pytest.raises(ValueError, match="ref_logp"):
        rl_step(_setup(opt, cfg)[2], batch, jnp.float32(0.0), False)


def test_minibatches_take_whole_groups():
    batch = _batch()
    batch["privileged"] = np.arange(G * K)[:, None]
    mbs = rl.minibatches(batch, 2)
    assert [len(mb["prompt"]) for mb in mbs] == [2, 2]
    assert [len(mb["response"]) for mb in mbs] == [6, 6]
    np.testing.assert_array_equal(mbs[1]["prompt"], batch["prompt"][2:])
    np.testing.assert_array_equal(mbs[1]["privileged"][:, 0], np.arange(6, 12))
    with pytest.raises(ValueError, match="do not split 4 groups"):
        rl.minibatches(batch, 3)
