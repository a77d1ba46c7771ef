"""The train step's shared-prompt layout: G prompts for R = G * k responses must give what
repeating each prompt k times gives (hidden states, gradients, a whole RL step), for dense, MoE
(router statistics over distinct tokens) and hybrid models, with remat, and on a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtrace import models, sharding, steps
from jaxtrace.models.hybrid import linearize
from jaxtrace.models.moe import router_aux_loss
from tests.test_moe_model_sharding import _cfg as moe_config
from tests.test_sharding import CFG as dense_config

DENSE = dense_config  # the sharding tests' tiny dense Qwen3
MOE = moe_config()  # 8 experts, top-2, layer 0 dense
G, K, P, N = 2, 3, 5, 7  # odd sizes on purpose


def _batch(vocab, g=G, k=K, seed=0):
    """Left-padded prompts of different lengths (one a single token), ragged responses (one empty,
    one a single token)."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, vocab, (g, P)).astype(np.int32)
    prompt_valid = np.arange(P)[None, :] >= rng.integers(0, P, g)[:, None]
    prompt_valid[0, :2], prompt_valid[1, :] = False, np.arange(P) == P - 1
    lengths = np.resize([N, 4, 0, 1, N, 6], g * k)
    response_mask = np.arange(N)[None, :] < lengths[:, None]
    response = np.where(response_mask, rng.integers(1, vocab, (g * k, N)), 0).astype(np.int32)
    return {
        "prompt": prompt,
        "prompt_valid": prompt_valid,
        "response": response,
        "response_mask": response_mask,
        "advantages": rng.standard_normal(g * k).astype(np.float32),
        "route": np.zeros((g * k, N), np.int32),
    }


def _repeated(batch):
    out = dict(batch)
    k = batch["response"].shape[0] // batch["prompt"].shape[0]
    for key in ("prompt", "prompt_valid"):
        out[key] = np.repeat(batch[key], k, axis=0)
    return out


def _assert_trees_close(got, want, tol=1e-3):
    """Each leaf within tol of the leaf's own scale: gradients are float32 sums taken in another
    order (a lost gradient path is off by O(1))."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        scale = max(float(np.max(np.abs(b))), 1e-6)
        err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        assert err <= tol * scale, f"{jax.tree_util.keystr(path)}: {err} vs scale {scale}"


def _hidden(cfg, params, graphdef, batch, return_aux=False):
    model = nnx.merge(graphdef, params)
    args = (batch["prompt"], batch["prompt_valid"], batch["response"], batch["response_mask"])
    return steps.response_hidden(model, *args, return_aux=return_aux)


@pytest.mark.parametrize("remat", [False, True])
def test_shared_prompt_hidden_and_grads_equal_repeated(remat):
    cfg = DENSE.replace(remat=remat)
    graphdef, params = models.create(cfg, 0)
    batch = _batch(cfg.vocab_size)
    mask = jnp.asarray(batch["response_mask"])[..., None]

    def loss(p, b):
        h = _hidden(cfg, p, graphdef, b)
        return jnp.sum(jnp.where(mask, h, 0.0) ** 2)

    shared, want = (
        _hidden(cfg, params, graphdef, batch),
        _hidden(cfg, params, graphdef, _repeated(batch)),
    )
    assert shared.shape == (G * K, N, cfg.hidden_size)
    np.testing.assert_allclose(shared, want, rtol=1e-5, atol=1e-5)
    g_shared = jax.grad(loss)(params, batch)
    g_want = jax.grad(loss)(params, _repeated(batch))
    _assert_trees_close(g_shared, g_want)


def test_shared_prompt_moe_counts_each_prompt_token_once():
    graphdef, params = models.create(MOE, 0)
    batch = _batch(MOE.vocab_size)
    h, aux, valid = _hidden(MOE, params, graphdef, batch, return_aux=True)
    h_rep, aux_rep, _ = _hidden(MOE, params, graphdef, _repeated(batch), return_aux=True)
    np.testing.assert_allclose(h, h_rep, rtol=1e-5, atol=1e-5)
    assert aux[0] is None  # layer 0 is dense (mlp_only_layers)
    # The joined statistics are the prompt tokens once per group, then every response token
    # (padding differs: a masked query attends uniformly over a different number of keys).
    np.testing.assert_array_equal(
        valid[0], np.concatenate([batch["prompt_valid"].ravel(), batch["response_mask"].ravel()])
    )
    real = np.asarray(valid[0])
    for key in ("router_logits_BxTxE", "topk_ids_BxTxK"):
        x = aux_rep[1][key]
        want = jnp.concatenate(
            [x[::K, :P].reshape(-1, x.shape[-1]), x[:, P:].reshape(-1, x.shape[-1])]
        )
        np.testing.assert_allclose(aux[1][key][0][real], want[real], rtol=1e-5, atol=1e-6)
    loss, _ = router_aux_loss(MOE, aux, valid)
    assert np.isfinite(loss) and loss > 0


def test_shared_prompt_hybrid_repeats_the_prompt():
    cfg = linearize(DENSE, (0,), hybrid_window=4, hybrid_chunk=3)
    graphdef, params = models.create(cfg, 0)
    batch = _batch(cfg.vocab_size)
    np.testing.assert_allclose(
        _hidden(cfg, params, graphdef, batch),
        _hidden(cfg, params, graphdef, _repeated(batch)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_rows_not_a_whole_number_of_groups_is_an_error():
    graphdef, params = models.create(DENSE, 0)
    batch = _batch(DENSE.vocab_size)
    batch["prompt"], batch["prompt_valid"] = (
        batch["prompt"][:1].repeat(4, 0),
        batch["prompt_valid"][:1].repeat(4, 0),
    )
    with pytest.raises(ValueError, match="6 response rows are not a whole number of groups of 4"):
        _hidden(DENSE, params, graphdef, batch)


def _one_step(batch, mesh=None):
    graphdef, params = models.create(DENSE, 0)
    opt = optax.sgd(1.0)  # params move by the gradient itself (Adam's first step is ~sign(g))
    step = steps.make_rl_step(graphdef, opt, steps.LossConfig(mode="grpo"))
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}
    if mesh is not None:
        state = jax.device_put(state, sharding.replicated(mesh))
        batch = sharding.shard_step_batch(batch, mesh)
    state, metrics = step(state, batch, jnp.float32(0.0), False)
    return jax.device_get(state["params"]), jax.device_get(metrics)


def test_rl_step_with_shared_prompts_equals_repeated():
    batch = _batch(DENSE.vocab_size)
    (p_shared, m_shared), (p_rep, m_rep) = _one_step(batch), _one_step(_repeated(batch))
    for key in ("loss", "grad_norm", "entropy"):
        np.testing.assert_allclose(m_shared[key], m_rep[key], rtol=1e-5)
    _assert_trees_close(p_shared, p_rep, 1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)")
@pytest.mark.parametrize("num_prompts", [8, 4])  # 4 prompts do not split over 8: replicated
def test_rl_step_with_shared_prompts_on_the_mesh(num_prompts):
    mesh = sharding.make_mesh({"data": -1})
    batch = _batch(DENSE.vocab_size, g=num_prompts, k=16 // num_prompts)
    (p_mesh, m_mesh), (p_one, m_one) = _one_step(batch, mesh), _one_step(_repeated(batch))
    np.testing.assert_allclose(m_mesh["loss"], m_one["loss"], rtol=1e-5)
    _assert_trees_close(p_mesh, p_one, 1e-5)
