"""Decoder layers stored stacked and run under `jax.lax.scan` (`qwen3.run_layers`).

Checked against a hand-written reference: each layer built on its own as a `DecoderLayer`, given
its slice of the stacked params, and applied in order. Configs: dense, MoE with dense layers
mixed in (periodic and not), hybrid with every other layer linearised (and not periodic)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxtrace import models, sharding
from jaxtrace.models import ModelConfig, causal_mask, positions_from_valid
from jaxtrace.models.config import period
from jaxtrace.models.hybrid import linearize
from jaxtrace.models.moe import router_aux_loss
from jaxtrace.models.qwen3 import DecoderLayer

BASE = ModelConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=10_000.0,
    tie_word_embeddings=False,
)
MOE = dict(family="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
CONFIGS = {
    "dense": BASE,
    "moe_every_other": BASE.replace(decoder_sparse_step=2, **MOE),  # dense, MoE, dense, MoE
    "moe_first_dense": BASE.replace(num_layers=3, mlp_only_layers=(0,), **MOE),  # no period
    "hybrid_every_other": linearize(BASE, (1, 3), hybrid_window=3),
    "hybrid_no_period": linearize(BASE.replace(num_layers=3), (0,), hybrid_window=3),
}
PERIODS = {  # (param_period, scan_period)
    "dense": (1, 1),
    "moe_every_other": (2, 2),
    "moe_first_dense": (3, 3),
    "hybrid_every_other": (1, 2),
    "hybrid_no_period": (1, 3),
}


def _inputs(b=2, t=7):
    tokens = jax.random.randint(jax.random.key(3), (b, t), 0, BASE.vocab_size)
    valid = jnp.arange(t)[None] >= jnp.array([[0], [2]])[:b]  # row 1 left-padded
    return tokens, positions_from_valid(valid), causal_mask(valid), valid


def _reference(cfg, params, tokens, positions, mask):
    """Per-layer loop over freshly built layers holding their slice of the stacks."""
    x = jnp.take(params["embed_tokens"], tokens, axis=0)
    pp = cfg.param_period
    aux = []
    for i in range(cfg.num_layers):
        layer = DecoderLayer(cfg, i, nnx.Rngs(params=0))
        entry = i // pp
        nnx.update(layer, jax.tree.map(lambda w, b=entry: w[b], params["layers"][i % pp]))
        x, _, a = layer(x, positions, mask)
        aux.append(a)
    x32 = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps)
    return x32 * params["norm"]["weight"], aux


def _loss(cfg, graphdef, params, tokens, positions, mask, valid):
    hidden, _, aux = models.apply(graphdef, params, tokens, positions, mask, return_aux=True)
    logits = jnp.einsum("btd,dv->btv", hidden, params["lm_head"])
    lbl, _ = router_aux_loss(cfg, aux, valid)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + lbl


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scan_equals_unrolled_and_reference(name):
    cfg = CONFIGS[name]
    assert (cfg.param_period, cfg.scan_period) == PERIODS[name]
    tokens, positions, mask, valid = _inputs()
    graphdef, params = models.create(cfg, seed=0)
    lead = cfg.num_layers // cfg.param_period
    assert all(w.shape[0] == lead for w in jax.tree.leaves(params["layers"]))
    ref_hidden, ref_aux = _reference(cfg, params, tokens, positions, mask)
    grads = {}
    for scan, remat in ((True, "none"), (False, "none"), (True, "full"), (True, "dots")):
        c = cfg.replace(scan_layers=scan, remat=remat)
        g = models.abstract_model(c)[0]
        hidden, _, aux = jax.jit(
            lambda p, g=g: models.apply(g, p, tokens, positions, mask, return_aux=True)
        )(params)
        np.testing.assert_allclose(hidden, ref_hidden, atol=2e-5, rtol=2e-5)
        assert [a is None for a in aux] == [a is None for a in ref_aux]
        for a, r in zip(aux, ref_aux):
            if r is not None:
                np.testing.assert_allclose(
                    a["router_logits_BxTxE"], r["router_logits_BxTxE"], atol=2e-5
                )
                np.testing.assert_array_equal(a["topk_ids_BxTxK"], r["topk_ids_BxTxK"])
        grad_fn = jax.jit(
            jax.grad(lambda p, c=c, g=g: _loss(c, g, p, tokens, positions, mask, valid))
        )
        grads[(scan, remat)] = grad_fn(params)
    ref = grads[(False, "none")]
    for grad in grads.values():
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grad, ref)
    assert any(float(jnp.abs(w).max()) > 0 for w in jax.tree.leaves(ref["layers"]))


@pytest.mark.parametrize("name", ["dense", "hybrid_every_other", "moe_every_other"])
def test_cached_prefill_and_decode_equal_full_forward(name):
    """The stacked cache through the scan: prefill of T - 1 tokens, then one decode step per
    row at its own slot (the engine's `cache_index` [B]), equal to the full forward."""
    cfg = CONFIGS[name]
    tokens, positions, mask, valid = _inputs(t=7)
    graphdef, params = models.create(cfg, seed=0)
    full, _ = models.apply(graphdef, params, tokens, positions, mask)
    b, t = tokens.shape
    cache = models.init_cache(cfg, b, t)
    leaves = jax.tree.leaves(cache)
    assert all(x.shape[:2] == (cfg.num_layers // cfg.scan_period, b) for x in leaves)
    _, cache = models.apply(
        graphdef,
        params,
        tokens[:, :-1],
        positions[:, :-1],
        models.prefill_mask(valid[:, :-1], t),
        cache=cache,
        cache_index=0,
    )
    step, _ = models.apply(
        graphdef,
        params,
        tokens[:, -1:],
        positions[:, -1:],
        models.decode_mask(valid, jnp.full((b,), t - 1)),
        cache=cache,
        cache_index=jnp.full((b,), t - 1),
    )
    np.testing.assert_allclose(step[:, 0], full[:, -1], atol=2e-5, rtol=2e-5)
    # The same step on per-layer weights and caches (CPU decode loops: `unstacked_decode`).
    model = nnx.merge(graphdef, params)
    per_layer = models.unstack_cache(cfg, cache)
    assert len(per_layer) == cfg.num_layers
    assert all(x.shape[0] == b for x in jax.tree.leaves(per_layer))
    jax.tree.map(np.testing.assert_array_equal, models.stack_cache(cfg, per_layer), cache)
    layers = models.unstack_layers(cfg, model.layer_stacks())
    one, new_cache = model(
        tokens[:, -1:], positions[:, -1:], models.decode_mask(valid, jnp.full((b,), t - 1)),
        per_layer, jnp.full((b,), t - 1), layers=layers,
    )  # fmt: skip
    np.testing.assert_allclose(one, step, atol=1e-6, rtol=1e-6)
    assert len(new_cache) == cfg.num_layers


def test_cache_row_helpers():
    cfg = CONFIGS["hybrid_every_other"]
    cache = jax.tree.map(
        lambda x: jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), models.init_cache(cfg, 3, 5)
    )
    taken = models.take_cache_rows(cache, jnp.array([2, 0]))
    rep = models.repeat_cache_rows(cache, 2)
    padded = models.pad_cache_slots(cache, 8)
    for c, t_, r in zip(jax.tree.leaves(cache), jax.tree.leaves(taken), jax.tree.leaves(rep)):
        np.testing.assert_array_equal(t_, np.asarray(c)[:, [2, 0]])
        np.testing.assert_array_equal(r, np.repeat(np.asarray(c), 2, axis=1))
    kv, state = cache[0], cache[1]
    assert models.is_kv(kv) and not models.is_kv(state)
    assert padded[0]["k"].shape == (2, 3, cfg.num_kv_heads, 8, cfg.head_dim)
    np.testing.assert_array_equal(padded[0]["k"][:, :, :, :5], kv["k"])
    assert not np.asarray(padded[0]["k"][:, :, :, 5:]).any()
    assert padded[1] is state  # hybrid states do not grow
    grown = models.grow_cache([kv], 2, 3)[0]["v"]
    np.testing.assert_array_equal(grown[:, :, :, :5], np.repeat(np.asarray(kv["v"]), 2, axis=1))
    assert grown.shape[3] == 8


def test_program_size_independent_of_depth():
    """The point of the scan: the traced program holds one block whatever the depth (unrolled,
    it holds every layer)."""

    def num_eqns(cfg):
        graphdef, params = models.abstract_model(cfg)
        tokens, positions, mask, _ = _inputs()
        fn = lambda p: models.apply(graphdef, p, tokens, positions, mask)[0].sum()  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(fn))(params)
        return len(str(jaxpr).splitlines())

    scanned = [num_eqns(BASE.replace(num_layers=n)) for n in (2, 8)]
    unrolled = [num_eqns(BASE.replace(num_layers=n, scan_layers=False)) for n in (2, 8)]
    assert scanned[0] == scanned[1]
    assert unrolled[1] > 3 * unrolled[0]


def test_periods_and_remat_names():
    assert period([0, 1, 0, 1]) == 2 and period([1, 1, 1]) == 1 and period([0, 1, 1]) == 3
    hybrid = linearize(BASE.replace(num_layers=28), range(0, 28, 2))
    assert (hybrid.param_period, hybrid.scan_period) == (1, 2)
    assert BASE.replace(remat=True).remat == "full" and BASE.replace(remat=False).remat == "none"
    with pytest.raises(ValueError, match="ModelConfig.remat='most'"):
        BASE.replace(remat="most")


needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)")


@needs8
def test_sharded_init_keeps_layers_axis_replicated():
    cfg = CONFIGS["moe_every_other"]
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "expert": 2})
    _, params = sharding.init_sharded(cfg, mesh, seed=0)
    axes = models.logical_axes(cfg)
    assert axes["layers"][1]["mlp"]["gate_proj"] == ("layers", "expert", "embed", "mlp")
    assert params["layers"][1]["mlp"]["gate_proj"].sharding.spec == P(
        None, "expert", "fsdp", "tensor"
    )
    assert params["layers"][0]["mlp"]["down_proj"].sharding.spec == P(None, "tensor", "fsdp")
    assert params["layers"][0]["self_attn"]["q_proj"].shape == (2, 32, 4, 8)
    _, ref = models.create(cfg, seed=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params, ref)


def test_checkpoint_from_before_the_stacking_is_a_clear_error(tmp_path):
    from jaxtrace import checkpoint  # noqa: PLC0415
    from jaxtrace.errors import InputError  # noqa: PLC0415

    cfg = BASE.replace(num_layers=2)
    _, params = models.create(cfg, seed=0)
    per_layer = dict(params, layers={i: _index_tree(params["layers"][0], i) for i in range(2)})
    for name, tree in (("old", per_layer), ("new", params)):
        ckpt = checkpoint.Checkpointer(str(tmp_path / name), async_save=False)
        ckpt.save(1, {"params": tree, "step": jnp.int32(0)}, {})
        ckpt.close()
    _, abstract = models.abstract_model(cfg)
    with pytest.raises(InputError, match="per-layer params layout"):
        checkpoint.restore_params(str(tmp_path / "old"), abstract)
    restored, _ = checkpoint.restore_params(str(tmp_path / "new"), abstract)
    jax.tree.map(np.testing.assert_array_equal, restored, params)


def _index_tree(tree, i):
    return jax.tree.map(lambda w: w[i], tree)


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_hf_parity_and_exact_round_trip_when_scanned(tmp_path, family):
    """4 HF layers into stacks that the scan runs in 4 (dense) or 2 blocks (MoE layers 1 and 3,
    dense 0 and 2): logits equal transformers', and save_hf writes back HF's exact tensors."""
    pytest.importorskip("transformers")
    from safetensors.numpy import load_file  # noqa: PLC0415

    from jaxtrace.models import hf as hf_io  # noqa: PLC0415
    from tests.hf_utils import tiny_qwen3, torch_logits  # noqa: PLC0415
    from tests.test_moe_vs_hf import tiny_qwen3_moe  # noqa: PLC0415

    if family == "dense":
        model, path = tiny_qwen3(tmp_path, layers=4)
    else:
        model, path = tiny_qwen3_moe(tmp_path, sparse_step=2, layers=4)
    cfg, graphdef, params = hf_io.load_hf(path)
    assert cfg.num_layers // cfg.scan_period == (4 if family == "dense" else 2)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9))
    ours = jax.jit(models.forward_logits, static_argnums=0)(graphdef, params, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(ours), torch_logits(model, ids), atol=1e-4, rtol=1e-4)
    out = hf_io.save_hf(cfg, params, str(tmp_path / "export"))
    want = load_file(f"{path}/model.safetensors")
    got = load_file(f"{out}/model.safetensors")
    assert set(got) == set(want)
    for name, value in got.items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)


def test_training_through_the_shared_prompt_cache_saves_each_layers_cache_once():
    """The shared-prompt training pass differentiates through a stacked KV cache [L, R, Hkv, S,
    Dh]. Each layer's backward may keep its own layer's cache, never the whole stack (L x the
    cache: the decode steps' in-place write, used in a training pass, did that)."""
    from flax import nnx

    from jaxtrace import steps

    layers, g, r, p, n = 4, 2, 8, 16, 24
    cfg = ModelConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=layers, num_heads=4,
        num_kv_heads=2, head_dim=16, remat="full",
    )  # fmt: skip
    graphdef, params = models.create(cfg)
    args = (jnp.ones((g, p), jnp.int32), jnp.ones((g, p), bool))
    args += (jnp.ones((r, n), jnp.int32), jnp.ones((r, n), bool))

    def loss(params, *a):
        return jnp.sum(steps.response_hidden(nnx.merge(graphdef, params), *a) ** 2)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, *args))
    assert f"[{layers},{r},2,{p + n},16]" in jaxpr  # the stacked cache is there
    assert f"[{layers},{layers},{r},2,{p + n},16]" not in jaxpr  # and never saved per layer
