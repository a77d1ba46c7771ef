"""Qwen3-MoE on a {"data": 2, "expert": 4} mesh of 8 host devices: expert weights really sharded
over `expert`, and the sharded forward (logits, router aux, balancing loss, gradients) equals the
single-device one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrace import sharding
from jaxtrace.models import forward_logits, preset
from jaxtrace.steps import student_hidden

NUM_EXPERTS = 8


def _cfg():
    return preset(
        "tiny",
        vocab_size=64,
        num_layers=2,
        hidden_size=32,
        num_heads=2,
        num_kv_heads=2,
        head_dim=16,
        family="qwen3_moe",
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        mlp_only_layers=(0,),
    )


@pytest.fixture(scope="module")
def setup():
    if jax.device_count() < 8:
        pytest.skip("needs 8 host devices (tests/conftest.py sets XLA_FLAGS)")
    cfg = _cfg()
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    graphdef, params = sharding.init_sharded(cfg, mesh, seed=0)
    host = jax.tree.map(np.asarray, params)
    return cfg, mesh, graphdef, params, host


def test_expert_weights_sharded_on_expert_axis(setup):
    _, mesh, _, params, _ = setup
    mlp = params["layers"][1]["mlp"]  # [layers, ...]: the stack of layer 1 (layer 0 is dense)
    for name in ("gate_proj", "up_proj", "down_proj"):
        w = mlp[name]
        assert w.sharding.spec[:2] == (None, "expert"), (name, w.sharding.spec)
        shard_shapes = {s.data.shape for s in w.addressable_shards}
        assert shard_shapes == {(w.shape[0], NUM_EXPERTS // 4, *w.shape[2:])}
    assert mlp["router"].sharding.spec == jax.sharding.PartitionSpec(None, None, "expert")
    dense = params["layers"][0]["mlp"]["gate_proj"]  # dense layer: no expert dim, replicated
    assert "expert" not in tuple(dense.sharding.spec)


def _batch(rng, rows=8, p=5, n=4, vocab=64):
    prompt_valid = np.ones((rows, p), bool)
    prompt_valid[::3, :2] = False  # left padding
    response_mask = np.ones((rows, n), bool)
    response_mask[1::2, -1:] = False  # right padding
    return {
        "prompt": rng.integers(0, vocab, (rows, p)).astype(np.int32),
        "prompt_valid": prompt_valid,
        "response": rng.integers(0, vocab, (rows, n)).astype(np.int32),
        "response_mask": response_mask,
    }


def _loss_fn(graphdef):
    def loss(params, batch):
        model = nnx.merge(graphdef, params)
        h, moe_loss, metrics = student_hidden(model, batch)
        return jnp.sum(model.logits(h)[..., :7] ** 2) * 1e-2 + moe_loss, metrics

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_sharded_forward_equals_unsharded(setup):
    cfg, mesh, graphdef, params, host = setup
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (8, 9)).astype(np.int32)
    logits_fn = jax.jit(lambda p, t: forward_logits(graphdef, p, t))
    sharded = logits_fn(params, sharding.shard_batch(ids, mesh))
    single = jax.devices()[0]
    reference = logits_fn(jax.device_put(host, single), jax.device_put(ids, single))
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(reference), atol=1e-5, rtol=1e-5)

    batch = _batch(rng)
    (loss, metrics), grads = _loss_fn(graphdef)(params, sharding.shard_batch(batch, mesh))
    (loss_r, metrics_r), grads_r = _loss_fn(graphdef)(
        jax.device_put(host, single), jax.device_put(batch, single)
    )
    np.testing.assert_allclose(float(loss), float(loss_r), rtol=1e-5)
    assert float(metrics["moe/lbl_loss"]) > 0
    for k in metrics_r:
        np.testing.assert_allclose(float(metrics[k]), float(metrics_r[k]), rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
