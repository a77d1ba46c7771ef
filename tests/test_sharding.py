"""Mesh + logical-axis sharding on 8 forced CPU devices (tests/conftest.py sets them)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxtrace import models, sharding
from jaxtrace.models import ModelConfig

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_word_embeddings=False,
)

needs8 = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices (XLA_FLAGS set by tests/conftest.py before jax starts)",
)


@needs8
def test_fill_axis_and_bad_meshes():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="multiple of 3 devices"):
        sharding.make_mesh({"data": -1, "tensor": 3})
    with pytest.raises(ValueError, match="must multiply to the device count"):
        sharding.make_mesh({"data": 2, "tensor": 2})
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        sharding.make_mesh({"model": 8})


@needs8
def test_params_sharded_as_rules_say():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, params = sharding.init_sharded(CFG, mesh, seed=0)
    attn = params["layers"][0]["self_attn"]  # both layers stacked on a replicated leading axis
    assert attn["q_proj"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert attn["o_proj"].sharding.spec == P(None, "tensor", None, "fsdp")
    assert params["embed_tokens"].sharding.spec == P("tensor", "fsdp")
    assert params["lm_head"].sharding.spec == P("fsdp", "tensor")
    assert params["layers"][0]["mlp"]["down_proj"].sharding.spec == P(None, "tensor", "fsdp")
    assert params["norm"]["weight"].sharding.spec == P(None)
    # Really split: each device holds a quarter of q_proj.
    shard = attn["q_proj"].addressable_shards[0].data
    assert shard.shape == (CFG.num_layers, CFG.hidden_size // 2, CFG.num_heads // 2, CFG.head_dim)
    # Same values as an unsharded init with the same seed.
    _, ref = models.create(CFG, seed=0)
    # (jit fuses the init's scale, hence ulp-level differences.)
    np.testing.assert_allclose(
        np.asarray(attn["q_proj"]), np.asarray(ref["layers"][0]["self_attn"]["q_proj"]), rtol=1e-6
    )


@needs8
def test_indivisible_dims_fall_back_to_replicated():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
    spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 2, 8), mesh)
    assert spec == P(None, None, None)  # 2 kv heads cannot split 8 ways


@needs8
@pytest.mark.parametrize(
    "axes", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 4, "tensor": 2}]
)
def test_sharded_forward_equals_unsharded(axes):
    mesh = sharding.make_mesh(axes)
    graphdef, params = sharding.init_sharded(CFG, mesh, seed=3)
    _, ref_params = models.create(CFG, seed=3)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 12)).astype(np.int32)
    batch = sharding.shard_batch({"tokens": tokens}, mesh)
    fwd = jax.jit(models.forward_logits, static_argnums=0)
    sharded = fwd(graphdef, params, batch["tokens"])
    unsharded = fwd(graphdef, ref_params, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(unsharded), atol=2e-5, rtol=2e-5)


@needs8
def test_batch_not_divisible_is_a_clear_error():
    mesh = sharding.make_mesh({"data": 8})
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
        sharding.shard_batch({"tokens": np.zeros((6, 4), np.int32)}, mesh)


@needs8
@pytest.mark.parametrize("rows", [16, 6])  # 6 does not split over 8 devices: replicated
def test_sampler_on_the_mesh_equals_single_device(rows):
    """Prompts placed with shard_rows next to mesh-replicated params decode exactly as on one
    device (greedy and sampled), and split over the data axes when they divide evenly."""
    from jaxtrace.rollout import SamplingConfig, make_generate  # noqa: PLC0415

    graphdef, params = models.create(CFG, seed=0)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    on_mesh = jax.device_put(params, sharding.replicated(mesh))
    prompt = np.random.default_rng(0).integers(1, CFG.vocab_size, (rows, 7), dtype=np.int32)
    valid = np.ones(prompt.shape, bool)
    valid[0, :3] = False  # left padding in one row
    placed = sharding.shard_rows((prompt, valid), mesh)
    want_spec = P("data") if rows % 8 == 0 else P()
    assert placed[0].sharding.spec[:1] == want_spec[:1]
    for greedy in (True, False):
        cfg = SamplingConfig(max_prompt_len=7, max_new_tokens=5, greedy=greedy, num_samples=2)
        gen = make_generate(graphdef, cfg)
        want = gen(params, prompt, valid, jax.random.key(3), None)
        got = gen(on_mesh, *placed, jax.random.key(3), None)
        np.testing.assert_array_equal(np.asarray(got["response"]), np.asarray(want["response"]))
        np.testing.assert_allclose(
            np.asarray(got["logprobs"]), np.asarray(want["logprobs"]), atol=1e-5
        )
