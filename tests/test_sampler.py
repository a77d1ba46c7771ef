"""KV-cache sampler vs full forward passes and vs transformers' greedy generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrace import models
from jaxtrace.models import ModelConfig
from jaxtrace.rollout import SamplingConfig, left_pad, make_generate
from jaxtrace.rollout.sampler import sample_categorical

CFG = ModelConfig(
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
PROMPTS = [[5, 9, 2, 7], [11], [3, 4, 5, 6, 7, 8, 9]]  # ragged: left padding everywhere


@pytest.fixture(scope="module")
def model():
    graphdef, params = models.create(CFG, seed=1)
    # Larger weights give peaked, input-dependent distributions (a sharper test).
    params = jax.tree_util.tree_map_with_path(
        lambda k, x: x if "norm" in jax.tree_util.keystr(k) else x * 4.0, params
    )  # weights, not norms
    return graphdef, params


def full_logits(graphdef, params, out):
    """Logits of a plain full forward over prompt + response (no cache)."""
    tokens = jnp.concatenate([out["prompt"], out["response"]], axis=1)
    valid = jnp.concatenate([out["prompt_valid"], out["response_mask"]], axis=1)
    return np.asarray(models.forward_logits(graphdef, params, tokens, valid))


def run(model, cfg, prompts=PROMPTS, seed=0, max_new_B=None):
    graphdef, params = model
    tokens, valid = left_pad(prompts, cfg.max_prompt_len, cfg.pad_id)
    fn = make_generate(graphdef, cfg)
    out = fn(params, tokens, valid, jax.random.key(seed), max_new_B)
    return fn, jax.tree.map(np.asarray, out)


def test_greedy_equals_argmax_of_full_forward(model):
    cfg = SamplingConfig(max_prompt_len=8, max_new_tokens=9, greedy=True)
    _, out = run(model, cfg)
    logits = full_logits(*model, out)
    p = cfg.max_prompt_len
    assert out["response_mask"].all()
    for t in range(cfg.max_new_tokens):
        np.testing.assert_array_equal(out["response"][:, t], logits[:, p - 1 + t].argmax(-1))


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_sampled_logprobs_equal_full_forward(model, top_p):
    cfg = SamplingConfig(
        max_prompt_len=8, max_new_tokens=7, temperature=0.9, top_p=top_p, num_samples=2
    )
    _, out = run(model, cfg, seed=3)
    logits = full_logits(*model, out)
    p = cfg.max_prompt_len
    logp = jax.nn.log_softmax(logits[:, p - 1 : p - 1 + cfg.max_new_tokens], -1)
    want = np.take_along_axis(np.asarray(logp), out["response"][..., None], -1)[..., 0]
    np.testing.assert_allclose(out["logprobs"], np.where(out["response_mask"], want, 0), atol=2e-5)


def test_num_samples_repeat_prompts_and_differ(model):
    cfg = SamplingConfig(max_prompt_len=8, max_new_tokens=6, temperature=1.5, num_samples=4)
    _, out = run(model, cfg, seed=5)
    assert out["response"].shape == (12, 6)
    np.testing.assert_array_equal(out["prompt"][0], out["prompt"][3])
    assert len({tuple(r) for r in out["response"][:4]}) > 1


def test_stop_tokens_and_row_budgets(model):
    greedy = SamplingConfig(max_prompt_len=8, max_new_tokens=8, greedy=True)
    _, ref = run(model, greedy)
    stop_tok = int(ref["response"][0, 2])  # row 0 will stop on its third token
    cfg = SamplingConfig(
        max_prompt_len=8, max_new_tokens=8, greedy=True, stop_tokens=(stop_tok,), pad_id=0
    )
    _, out = run(model, cfg, max_new_B=jnp.asarray([8, 3, 8]))
    first = np.argmax(ref["response"][0] == stop_tok)
    assert out["length"][0] == first + 1 and out["stopped"][0]
    assert not out["response_mask"][0, first + 1 :].any()
    assert (out["response"][0, first + 1 :] == 0).all() and (
        out["logprobs"][0, first + 1 :] == 0
    ).all()
    assert out["length"][1] <= 3  # its own budget
    for row in range(3):  # before stopping, identical to the unconstrained greedy run
        n = out["length"][row]
        np.testing.assert_array_equal(out["response"][row, :n], ref["response"][row, :n])


def test_one_token_prompt_and_one_new_token(model):
    cfg = SamplingConfig(max_prompt_len=1, max_new_tokens=1, greedy=True)
    _, out = run(model, cfg, prompts=[[7], [8]])
    logits = full_logits(*model, out)
    np.testing.assert_array_equal(out["response"][:, 0], logits[:, 0].argmax(-1))


def test_compiles_once_per_config(model):
    cfg = SamplingConfig(max_prompt_len=8, max_new_tokens=4, temperature=1.0)
    fn, _ = run(model, cfg, seed=0)
    run_again = fn(model[1], *left_pad([[1, 2], [3], [4, 5, 6]], 8), jax.random.key(1), None)
    jax.block_until_ready(run_again)
    assert fn._cache_size() == 1


def test_prompt_over_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="prompt 1 has 5 tokens, more than max_prompt_len=4"):
        left_pad([[1], [1, 2, 3, 4, 5]], 4)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(max_prompt_len=4, max_new_tokens=4, temperature=0.0)


def test_matches_transformers_greedy_generate(tmp_path):
    pytest.importorskip("transformers")
    import torch

    from jaxtrace.models import hf as hf_io
    from tests.hf_utils import tiny_qwen3

    hf_model, path = tiny_qwen3(tmp_path, vocab=97)
    with torch.no_grad():  # sharper distributions so that argmax ties cannot happen
        for p in hf_model.parameters():
            if p.ndim > 1:
                p.mul_(3.0)
    hf_model.save_pretrained(path, safe_serialization=True)
    _, graphdef, params = hf_io.load_hf(path)
    prompt = [[4, 8, 15, 16, 23, 42]]
    with torch.no_grad():
        want = hf_model.generate(
            torch.tensor(prompt),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, 6:].numpy()
    cfg = SamplingConfig(max_prompt_len=6, max_new_tokens=10, greedy=True)
    _, out = run((graphdef, params), cfg, prompts=prompt)
    np.testing.assert_array_equal(out["response"][0], want)


# ------------------------------------------------------------------ sample_categorical
def _draw(logits, block, n, seed=0):
    fn = jax.jit(lambda k, x: sample_categorical(k, jnp.broadcast_to(x, (n, x.shape[0])), block))
    return np.asarray(fn(jax.random.key(seed), jnp.asarray(logits, jnp.float32)))


@pytest.mark.parametrize("v, block", [(300, 64), (300, 512), (256, 64)])  # ragged, one block, exact
def test_sample_categorical_frequencies_match_softmax(v, block):
    """Chi-square of 60k draws against softmax(logits), with a quarter of the entries at -inf."""
    rng = np.random.default_rng(v + block)
    logits = rng.normal(0, 1.5, v)
    logits[rng.permutation(v)[: v // 4]] = -np.inf
    p = np.exp(logits - logits.max())
    p /= p.sum()
    tokens = _draw(logits, block, 60_000)
    assert np.all(p[tokens] > 0), "a token with zero probability was drawn"
    counts = np.bincount(tokens, minlength=v)
    live = p > 0
    expected = p[live] * len(tokens)
    chi2 = np.sum((counts[live] - expected) ** 2 / expected)
    dof = live.sum() - 1
    # Mean dof, sd sqrt(2 dof): 6 sd is far outside chance for a fixed seed, and a biased sampler
    # (say one block or one token off by 10%) lands well beyond it at 60k draws.
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)


def test_sample_categorical_edge_cases():
    never = -np.inf
    # All mass on the last entry, in a padded last block: rounding never runs past it.
    assert set(_draw([never] * 99 + [0.0], 64, 2000)) == {99}
    assert set(_draw([0.0], 512, 10)) == {0}  # a one-entry vocabulary
    assert set(_draw([never, 3.0, never, never], 2, 500)) == {1}
    # Huge logits are shifted by their max first (no overflow to inf).
    assert set(_draw([1e30, never, 1e30 - 1e25], 2, 2000)) <= {0, 2}
