"""Linearised Qwen3 (jaxtrace.models.hybrid): the padded hybrid attention vs a per-row jnp
reference (values and gradients), prefill + constant-state decode == the full forward (layer and
sampler), constant cache size, dense checkpoints loading unchanged, and the dense limit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrace import models
from jaxtrace.models import ModelConfig, hf
from jaxtrace.models.hybrid import (
    HybridAttention,
    attend,
    init_hybrid_cache,
    linearize,
)
from jaxtrace.rollout import SamplingConfig, left_pad, make_generate
from pallas_kernels.linear_attention import feature_maps

DENSE = ModelConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=10_000.0,
    tie_word_embeddings=False,
)
# Layer 0 hybrid, layer 1 dense; window 4 < prompt lengths < generated lengths; chunk 3 divides
# nothing here; beta 1 so the linear branch weighs as much as the window.
HYBRID = linearize(DENSE, (0,), hybrid_window=4, hybrid_chunk=3, hybrid_beta=1.0)
PROMPTS = [[5, 9, 2, 7, 1, 3], [11], [3, 4, 5, 6, 7, 8, 9]]  # ragged: left padding everywhere


forward_logits = jax.jit(models.forward_logits, static_argnums=0)


def _sharp(params):
    """Larger weights give peaked, input-dependent distributions (a sharper test)."""
    return jax.tree_util.tree_map_with_path(
        lambda k, x: x if "norm" in jax.tree_util.keystr(k) else x * 4.0, params
    )  # weights, not norms


def _close(a, b, tol):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=tol * (1.0 + np.abs(b).max()), rtol=tol)


# ---------------------------------------------------------------------------- padded op
def reference_attend(q, k, v, q_lin, k_lin, log_g, valid, *, window, alpha, beta):
    """Row by row over the valid tokens only: explicit window softmax + decayed linear sum."""
    b, t, h, d = q.shape
    rep = lambda x: jnp.repeat(x, h // x.shape[1], axis=1)
    out = jnp.zeros((b, t, h, v.shape[-1]), jnp.float32)
    for row in range(b):
        idx = np.nonzero(np.asarray(valid[row]))[0]
        if idx.size == 0:
            continue
        qb, kb, vb = q[row, idx], rep(k[row, idx]), rep(v[row, idx])
        qlb, klb = q_lin[row, idx], rep(k_lin[row, idx])
        r = np.arange(idx.size)
        dist = r[:, None] - r[None, :]
        scores = jnp.einsum("ihd,jhd->hij", qb, kb) * d**-0.5
        near = (dist >= 0) & (dist < window)
        probs = jax.nn.softmax(jnp.where(near, scores, -jnp.inf), axis=-1)
        o_swa = jnp.einsum("hij,jhv->ihv", probs, vb)
        cum = jnp.zeros((idx.size, h)) if log_g is None else jnp.cumsum(log_g[row, idx], 0)
        decay = jnp.where(dist >= window, jnp.exp(cum.T[:, :, None] - cum.T[:, None, :]), 0.0)
        o_lin = jnp.einsum("hij,ihd,jhd,jhv->ihv", decay, qlb, klb, vb)
        out = out.at[row, idx].set(alpha * o_swa + beta * o_lin)
    return out


def _op_inputs(t, valid, *, decay, b=3, h=4, kv=2, d=8, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(r.normal(size=(b, t, kv, d)), jnp.float32)
    v = jnp.asarray(r.normal(size=(b, t, kv, d)), jnp.float32)
    log_g = jnp.asarray(-r.uniform(0.0, 0.4, size=(b, t, h)), jnp.float32) if decay else None
    phi = feature_maps.softmax_dim
    return (q, k, v, phi(q), phi(k), log_g, jnp.asarray(valid))


def _valid(t, kind):
    rows = np.ones((3, t), bool)
    if kind == "left":
        rows[0, : t // 2] = False
        rows[1, : t - 1] = False
    elif kind == "holes":
        rows[0, ::3] = False
        rows[1, :] = False  # a row that is all padding
        rows[2, 1:-1:2] = False
    return rows


SLOW = pytest.mark.slow


@pytest.mark.parametrize("t,window,kind,decay", [
    (1, 1, "full", True), (11, 4, "left", False), (13, 3, "holes", True),
    pytest.param(5, 3, "left", True, marks=SLOW), pytest.param(11, 16, "holes", True, marks=SLOW),
    pytest.param(13, 1, "holes", False, marks=SLOW), pytest.param(9, 2, "full", True, marks=SLOW),
])  # fmt: skip
def test_attend_matches_reference(t, window, kind, decay):
    args = _op_inputs(t, _valid(t, kind), decay=decay)
    kw = dict(window=window, alpha=0.7, beta=1.3)
    valid_np = np.asarray(args[-1])  # the reference's row loop needs concrete indices
    diff = [i for i, a in enumerate(args[:6]) if a is not None]
    cot = jnp.asarray(
        np.random.default_rng(1).normal(size=args[2].shape[:2] + args[0].shape[2:]), jnp.float32
    )

    def out_and_grads(fn):
        """One compile: the output and the VJP of <output, cot> w.r.t. every array input."""

        def run(*xs):
            def call(*ys):
                full = list(args)
                for i, y in zip(diff, ys, strict=True):
                    full[i] = y
                return fn(*full)

            o, pull = jax.vjp(call, *xs)
            return o, pull(cot)

        return jax.jit(run)(*[args[i] for i in diff])

    got, g_got = out_and_grads(lambda *a: attend(*a, chunk_size=4, **kw))
    want, g_ref = out_and_grads(lambda *a: reference_attend(*a[:-1], valid_np, **kw))
    _close(got, want, 1e-5)
    for a, b in zip(g_got, g_ref, strict=True):
        _close(a, b, 1e-4)


# ---------------------------------------------------------------------------- layer decode
@pytest.mark.parametrize("gate,prompt_len,window", [
    ("key", 7, 3), pytest.param("none", 2, 4, marks=SLOW), pytest.param("key", 9, 1, marks=SLOW),
])  # fmt: skip
def test_layer_prefill_then_decode_equals_full(gate, prompt_len, window):
    cfg = linearize(
        DENSE, hybrid_window=window, hybrid_chunk=4, hybrid_gate=gate, hybrid_gate_normalizer=2.0
    )
    graphdef, weights = nnx.split(HybridAttention(cfg, nnx.Rngs(params=3)))
    layer = jax.jit(lambda *a: nnx.merge(graphdef, weights)(*a))
    b, t_new = 3, 6
    t = prompt_len + t_new
    x = jnp.asarray(np.random.default_rng(2).normal(size=(b, t, cfg.hidden_size)), jnp.float32)
    valid = np.ones((b, t), bool)
    valid[0, : prompt_len // 2] = False  # left padding of the prompt
    valid[1, : prompt_len - 1] = False
    valid = jnp.asarray(valid)
    pos = models.positions_from_valid(valid)
    full, _ = layer(x, pos, models.causal_mask(valid), None, None)
    # Sampler layout: cache slots [0, S) hold prompt then generated tokens.
    kv_valid_BxS = valid
    slots = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (b, prompt_len))
    mask = models.AttentionMask(kv_valid_BxS, slots, 0)
    state = init_hybrid_cache(cfg, b)
    out, state = layer(x[:, :prompt_len], pos[:, :prompt_len], mask, state, 0)
    valid_p = valid[:, :prompt_len, None]
    _close(jnp.where(valid_p, out, 0), jnp.where(valid_p, full[:, :prompt_len], 0), 1e-5)
    for i in range(prompt_len, t):
        step_mask = models.decode_mask(kv_valid_BxS, i)
        out, state = layer(x[:, i : i + 1], pos[:, i : i + 1], step_mask, state, i)
        _close(out[:, 0], full[:, i], 1e-5)
    assert jax.tree.map(jnp.shape, state) == jax.tree.map(jnp.shape, init_hybrid_cache(cfg, b))


# ---------------------------------------------------------------------------- sampler
@pytest.fixture(scope="module")
def hybrid_model():
    graphdef, params = models.create(HYBRID, seed=1)
    return graphdef, _sharp(params)


def test_greedy_decode_equals_argmax_of_full_forward(hybrid_model):
    graphdef, params = hybrid_model
    cfg = SamplingConfig(max_prompt_len=8, max_new_tokens=9, greedy=True)
    tokens, valid = left_pad(PROMPTS, cfg.max_prompt_len, cfg.pad_id)
    out = make_generate(graphdef, cfg)(params, tokens, valid, jax.random.key(0))
    out = jax.tree.map(np.asarray, out)
    assert out["response_mask"].all()
    full_tokens = np.concatenate([out["prompt"], out["response"]], axis=1)
    full_valid = np.concatenate([out["prompt_valid"], out["response_mask"]], axis=1)
    logits = np.asarray(forward_logits(graphdef, params, full_tokens, full_valid))
    p = cfg.max_prompt_len
    for t in range(cfg.max_new_tokens):
        np.testing.assert_array_equal(out["response"][:, t], logits[:, p - 1 + t].argmax(-1))
    logp = np.asarray(jax.nn.log_softmax(logits[:, p - 1 : p - 1 + cfg.max_new_tokens], -1))
    want = np.take_along_axis(logp, out["response"][..., None], -1)[..., 0]
    np.testing.assert_allclose(out["logprobs"], want, atol=2e-5)


def test_hybrid_cache_does_not_grow_with_length():
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    short = jax.eval_shape(lambda: models.init_cache(HYBRID, 2, 16))
    long = jax.eval_shape(lambda: models.init_cache(HYBRID, 2, 4096))
    for i in HYBRID.hybrid_layers:
        assert jax.tree.map(jnp.shape, short[i]) == jax.tree.map(jnp.shape, long[i])
    dense_layers = [i for i in range(HYBRID.num_layers) if i not in HYBRID.hybrid_layers]
    assert all(size(long[i]) == 256 * size(short[i]) for i in dense_layers)  # the dense ones grow


# ---------------------------------------------------------------------------- checkpoints
def test_dense_checkpoint_loads_unchanged_and_equals_dense_when_window_covers(tmp_path):
    dense_graphdef, dense_params = models.create(DENSE, seed=4)
    dense_params = _sharp(dense_params)
    hf.save_hf(DENSE, dense_params, str(tmp_path))
    cfg, graphdef, params = hf.load_hf(
        str(tmp_path), family="qwen3_hybrid", hybrid_layers=(0, 1), hybrid_window=12
    )
    assert cfg == linearize(DENSE, hybrid_window=12)
    assert models.logical_axes(cfg) == models.logical_axes(DENSE)
    assert jax.tree.structure(params) == jax.tree.structure(dense_params)
    jax.tree.map(np.testing.assert_array_equal, params, dense_params)
    tokens, valid = left_pad([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [7, 8, 9], [4]], 12)
    want = forward_logits(dense_graphdef, dense_params, tokens, valid)
    # Window >= every row's length: the linear branch sees no key, alpha = 1 -> exactly dense.
    got = forward_logits(graphdef, params, tokens, valid)
    _close(jnp.where(valid[..., None], got, 0), jnp.where(valid[..., None], want, 0), 1e-5)
    # A shorter window changes the long row only (rows of <= 3 tokens stay inside it).
    short, _ = models.create(linearize(DENSE, hybrid_window=3))
    got = np.asarray(forward_logits(short, params, tokens, valid))
    keep = valid[1:, :, None]
    _close(np.where(keep, got[1:], 0), np.where(keep, np.asarray(want)[1:], 0), 1e-5)
    assert np.abs(got[0, 3:] - np.asarray(want)[0, 3:]).max() > 1e-2


def test_gradients_flow_and_are_finite(hybrid_model):
    graphdef, params = hybrid_model
    tokens, valid = left_pad(PROMPTS, 9)

    def loss(p):
        logits = models.forward_logits(graphdef, p, tokens, valid)
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * valid[:, 1:]) / valid[:, 1:].sum()

    grads = jax.jit(jax.grad(loss))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    attn = grads["layers"][0]["self_attn"]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert float(jnp.abs(attn[name]).max()) > 0, name


def test_full_attention_layers_chunked_equal_dense(hybrid_model):
    """Layer 1 is full softmax attention (models.attention): chunked in blocks of 2 == dense,
    with the hybrid layer 0 reading its valid keys from the same AttentionMask."""
    graphdef, params = hybrid_model
    chunked, _ = models.create(HYBRID.replace(attention_impl="chunked", attention_block=2))
    dense, _ = models.create(HYBRID.replace(attention_impl="dense"))
    tokens, valid = left_pad(PROMPTS, 9)
    got = forward_logits(chunked, params, tokens, valid)
    want = forward_logits(dense, params, tokens, valid)
    _close(jnp.where(valid[..., None], got, 0), jnp.where(valid[..., None], want, 0), 1e-5)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="hybrid_window"):
        linearize(DENSE, hybrid_window=0)
    with pytest.raises(ValueError, match="feature map"):
        linearize(DENSE, hybrid_feature_map="nope")
    with pytest.raises(ValueError, match="hybrid_layers"):
        linearize(DENSE, (0, 5))
    with pytest.raises(ValueError, match="unknown hybrid fields"):
        linearize(DENSE, window=3)
    with pytest.raises(ValueError, match="hybrid_gate"):
        models.create(DENSE.replace(family="qwen3_hybrid", hybrid_layers=(1,), hybrid_gate="x"))
