"""Qwen3 dense model == transformers Qwen3ForCausalLM (fp32 logits within 1e-4), import + export."""

import numpy as np
import pytest

pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from jaxtrace.models import forward_logits  # noqa: E402
from jaxtrace.models import hf as hf_io  # noqa: E402
from tests.hf_utils import tiny_qwen3, torch_logits  # noqa: E402

SHAPES = [  # heads, kv_heads, head_dim, hidden, tie
    dict(heads=4, kv_heads=2, head_dim=16, hidden=48, tie=False),  # head_dim != hidden / heads
    dict(heads=4, kv_heads=4, head_dim=12, hidden=48, tie=True),  # MHA, tied
    dict(heads=6, kv_heads=1, head_dim=8, hidden=32, tie=False),  # MQA
]


# models.attention: the default (dense at these sizes) and the chunked path in blocks of 4.
ATTENTION = [{}, dict(attention_impl="chunked", attention_block=4)]
ATTENTION_IDS = ["default", "chunked"]


@pytest.mark.parametrize("attention", ATTENTION, ids=ATTENTION_IDS)
@pytest.mark.parametrize(
    "shape",
    SHAPES,
    ids=lambda s: f"h{s['heads']}k{s['kv_heads']}d{s['head_dim']}{'t' if s['tie'] else 'u'}",
)
def test_logits_match_transformers(tmp_path, shape, attention):
    model, path = tiny_qwen3(tmp_path, **shape)
    cfg, graphdef, params = hf_io.load_hf(path, **attention)
    assert cfg.tie_word_embeddings == shape["tie"]
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11))
    ours = np.asarray(forward_logits(graphdef, params, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, torch_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", ATTENTION, ids=ATTENTION_IDS)
def test_left_padded_rows_match_unpadded(tmp_path, attention):
    model, path = tiny_qwen3(tmp_path)
    _, graphdef, params = hf_io.load_hf(path, **attention)
    ids = np.random.default_rng(1).integers(0, 97, (1, 6))
    padded = np.concatenate([np.zeros((1, 3), int), ids], axis=1)
    valid = np.concatenate([np.zeros((1, 3), bool), np.ones((1, 6), bool)], axis=1)
    ours = np.asarray(forward_logits(graphdef, params, jnp.asarray(padded), jnp.asarray(valid)))
    np.testing.assert_allclose(ours[:, 3:], torch_logits(model, ids), atol=1e-4, rtol=1e-4)
    assert np.isfinite(ours).all()  # fully padded query rows must not produce NaN


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_in_transformers(tmp_path, tie):
    from transformers import Qwen3ForCausalLM

    model, path = tiny_qwen3(tmp_path, tie=tie)
    cfg, graphdef, params = hf_io.load_hf(path)
    out = hf_io.save_hf(cfg, params, str(tmp_path / "export"))
    reloaded = Qwen3ForCausalLM.from_pretrained(out).eval().float()
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 9))
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(model, ids), atol=1e-5)
    # And back: a round trip through our writer and reader is exact.
    _, _, params2 = hf_io.load_hf(out)
    for a, b in zip(jax_leaves(params), jax_leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_export_with_index(tmp_path):
    model, path = tiny_qwen3(tmp_path)
    cfg, graphdef, params = hf_io.load_hf(path)
    out = hf_io.save_hf(cfg, params, str(tmp_path / "sharded"), max_shard_bytes=20_000)
    import os

    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    _, _, params2 = hf_io.load_hf(out)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 5)))
    np.testing.assert_array_equal(
        np.asarray(forward_logits(graphdef, params, ids)),
        np.asarray(forward_logits(graphdef, params2, ids)),
    )


def test_bfloat16_export_roundtrip(tmp_path):
    model, path = tiny_qwen3(tmp_path)
    cfg, _, params = hf_io.load_hf(path)
    out = hf_io.save_hf(cfg, params, str(tmp_path / "bf16"), dtype="bfloat16")
    cfg2, _, params2 = hf_io.load_hf(out, param_dtype="float32")
    a = np.asarray(params["embed_tokens"]).astype(np.float32)
    b = np.asarray(params2["embed_tokens"]).astype(np.float32)
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "qwen3", "vocab_size": 8, '
        '"hidden_size": 8, "intermediate_size": 8, '
        '"num_hidden_layers": 1, "num_attention_heads": 2}'
    )
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="safetensors only"):
        hf_io.load_hf(str(tmp_path))


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)
