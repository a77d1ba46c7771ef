"""Qwen3-MoE == transformers Qwen3MoeForCausalLM (fp32 logits within 1e-4), the HF
load-balancing loss, export back to transformers, and greedy sampling on the MoE model."""

import functools

import numpy as np
import pytest

pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxtrace.models import (  # noqa: E402
    abstract_model,
    apply,
    causal_mask,
    create,
    forward_logits,
    positions_from_valid,
    preset,
)
from jaxtrace.models import hf as hf_io  # noqa: E402
from jaxtrace.models.moe import router_aux_loss  # noqa: E402
from tests.hf_utils import torch_logits  # noqa: E402


def tiny_qwen3_moe(
    tmp_path,
    *,
    norm_topk_prob=True,
    sparse_step=1,
    mlp_only=(),
    experts=4,
    top_k=2,
    tie=False,
    layers=3,
    seed=0,
):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=56,
        moe_intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=sparse_step,
        mlp_only_layers=list(mlp_only),
        tie_word_embeddings=tie,
        rope_theta=10_000.0,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
    )
    model = Qwen3MoeForCausalLM(config).eval().float()
    # Random norms, and a router sharp enough that top-k has no near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif ".mlp.gate.weight" in name:
                p.copy_(0.5 * torch.randn_like(p))
            elif ".mlp.experts." in name:
                p.copy_(0.1 * torch.randn_like(p))
    path = tmp_path / f"hf_moe_{norm_topk_prob}_{sparse_step}_{len(mlp_only)}_{tie}"
    model.save_pretrained(path, safe_serialization=True)
    return model, str(path)


# Jitted: an eager forward dispatches (and compiles) hundreds of small ops, ~3x slower on CPU.
_logits = jax.jit(forward_logits, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _hidden_and_aux(graphdef, params, ids, valid):
    pos, mask = positions_from_valid(valid), causal_mask(valid)
    return apply(graphdef, params, ids, pos, mask, return_aux=True)


VARIANTS = [  # norm_topk_prob, decoder_sparse_step, mlp_only_layers, tie
    dict(norm_topk_prob=True, sparse_step=1, mlp_only=(0,), tie=False),
    dict(norm_topk_prob=False, sparse_step=2, mlp_only=(), tie=False),
    dict(norm_topk_prob=False, sparse_step=1, mlp_only=(), tie=True),
]


def _id(v):
    return f"norm{int(v['norm_topk_prob'])}-step{v['sparse_step']}-only{len(v['mlp_only'])}" + (
        "-tied" if v["tie"] else ""
    )


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_logits_match_transformers(tmp_path, variant):
    model, path = tiny_qwen3_moe(tmp_path, **variant)
    cfg, graphdef, params = hf_io.load_hf(path)
    assert cfg.family == "qwen3_moe" and cfg.norm_topk_prob == variant["norm_topk_prob"]
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    assert 0 < len(moe_layers)
    if variant["sparse_step"] > 1 or variant["mlp_only"]:
        assert len(moe_layers) < cfg.num_layers  # dense and MoE layers mixed
    pp = cfg.param_period  # layer i is entry i // pp of stack i % pp
    stacked = params["layers"][moe_layers[0] % pp]["mlp"]["gate_proj"]
    assert stacked.shape == (cfg.num_layers // pp, 4, 32, 24)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11))
    ours = np.asarray(_logits(graphdef, params, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, torch_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", [{}, dict(attention_impl="chunked", attention_block=3)])
def test_length_one_and_left_padding(tmp_path, attention):
    model, path = tiny_qwen3_moe(tmp_path, mlp_only=(1,))
    _, graphdef, params = hf_io.load_hf(path, **attention)
    ids = np.random.default_rng(1).integers(0, 97, (1, 5))
    one = np.asarray(_logits(graphdef, params, jnp.asarray(ids[:, :1])))
    np.testing.assert_allclose(one, torch_logits(model, ids[:, :1]), atol=1e-4, rtol=1e-4)
    padded = np.concatenate([np.zeros((1, 3), int), ids], axis=1)
    valid = np.concatenate([np.zeros((1, 3), bool), np.ones((1, 5), bool)], axis=1)
    ours = np.asarray(_logits(graphdef, params, jnp.asarray(padded), jnp.asarray(valid)))
    np.testing.assert_allclose(ours[:, 3:], torch_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("padded", [False, True])
def test_load_balancing_loss_matches_transformers(tmp_path, padded):
    import torch

    model, path = tiny_qwen3_moe(tmp_path, mlp_only=(0,))
    cfg, graphdef, params = hf_io.load_hf(path)
    ids = np.random.default_rng(2).integers(0, 97, (3, 7))
    valid = np.ones(ids.shape, bool)
    if padded:
        valid[0, :3] = valid[2, :1] = False
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(valid.astype(np.int64)),
            output_router_logits=True,
        )
    v = jnp.asarray(valid)
    _, _, aux = _hidden_and_aux(graphdef, params, jnp.asarray(ids), v)
    assert aux[0] is None and all(a is not None for a in aux[1:])
    loss, metrics = router_aux_loss(cfg, aux, v)
    np.testing.assert_allclose(float(loss), float(out.aux_loss), rtol=1e-5, atol=1e-6)
    # Loads count real tokens only: K assignments each, and max/mean >= 1.
    counts = sum(
        np.bincount(np.asarray(a["topk_ids_BxTxK"])[valid].ravel(), minlength=4) for a in aux[1:]
    )
    assert counts.sum() == 2 * valid.sum() * 2
    assert set(metrics) >= {"moe/load_imbalance_layer1", "moe/load_imbalance_layer2"}
    assert "moe/load_imbalance_layer0" not in metrics
    assert all(float(metrics[k]) >= 1.0 for k in metrics if "imbalance" in k)


def _random_aux(rng, b, t, e, k):
    from pallas_kernels.moe_dispatch import route_topk

    logits = jnp.asarray(rng.normal(size=(b * t, e)), jnp.float32)
    _, ids, _ = route_topk(logits, k)
    return {"router_logits_BxTxE": logits.reshape(b, t, e), "topk_ids_BxTxK": ids.reshape(b, t, k)}


def test_global_lbl_is_per_layer_mean():
    cfg = preset(
        "tiny", family="qwen3_moe", num_experts=5, num_experts_per_tok=2, moe_intermediate_size=8
    )
    rng = np.random.default_rng(3)
    aux = [None, _random_aux(rng, 2, 7, 5, 2), _random_aux(rng, 2, 7, 5, 2)]
    v = jnp.asarray(rng.random((2, 7)) > 0.3)
    glob, metrics = router_aux_loss(cfg.replace(moe_global_lbl=True), aux, v)
    pooled, _ = router_aux_loss(cfg, aux, v)
    per_layer = [float(router_aux_loss(cfg, [a], v)[0]) for a in aux[1:]]  # one layer: equal
    np.testing.assert_allclose(float(glob), np.mean(per_layer), rtol=1e-6)
    assert abs(float(glob) - float(pooled)) > 1e-6  # pooling layers is a different loss
    assert float(metrics["moe/lbl_loss"]) == float(glob)
    assert router_aux_loss(cfg, [None, None], v) == (0.0, {})


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_in_transformers(tmp_path, tie):
    from transformers import Qwen3MoeForCausalLM

    model, path = tiny_qwen3_moe(tmp_path, norm_topk_prob=not tie, sparse_step=2, tie=tie)
    cfg, graphdef, params = hf_io.load_hf(path)
    out = hf_io.save_hf(cfg, params, str(tmp_path / "export"))
    reloaded = Qwen3MoeForCausalLM.from_pretrained(out).eval().float()
    assert reloaded.config.num_experts == 4
    assert reloaded.config.norm_topk_prob == (not tie)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 9))
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(model, ids), atol=1e-5)
    _, _, params2 = hf_io.load_hf(out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_greedy_sampler_equals_argmax_of_full_forward():
    from jaxtrace.rollout import make_generate
    from jaxtrace.rollout.sampler import SamplingConfig, left_pad

    cfg = preset(
        "tiny",
        vocab_size=61,
        family="qwen3_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        mlp_only_layers=(0,),
    )
    cfg = cfg.replace(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16)
    graphdef, params = create(cfg, seed=1)
    prompt, valid = left_pad([[5, 9, 2], [7], [1, 2, 3, 4]], max_len=4)
    sampling = SamplingConfig(max_prompt_len=4, max_new_tokens=5, greedy=True)
    out = make_generate(graphdef, sampling)(params, prompt, valid, jax.random.key(0))
    assert np.asarray(out["response_mask"]).all()  # no stop tokens: every row runs to 5
    tokens = jnp.concatenate([out["prompt"], out["response"]], axis=1)
    full_valid = jnp.concatenate([out["prompt_valid"], out["response_mask"]], axis=1)
    logits = _logits(graphdef, params, tokens, full_valid)
    greedy = np.asarray(jnp.argmax(logits[:, 3:-1], axis=-1))
    np.testing.assert_array_equal(np.asarray(out["response"]), greedy)


def test_bad_moe_config_raises():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        preset("tiny", family="qwen3_moe", num_experts=4, num_experts_per_tok=5)
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        abstract_model(preset("tiny", family="qwen3_moe", num_experts=4, num_experts_per_tok=2))
