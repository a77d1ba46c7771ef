"""Continuous rollout engine vs the static sampler, full forward passes and transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrace import models
from jaxtrace.models import ModelConfig, preset
from jaxtrace.rollout import SamplingConfig, engine, left_pad, make_generate

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
# (num_slots, min_bucket, min_slots): one slot per row; 3 slots (samples wait, slots refill,
# the cache grows 4 -> 8 -> 16 -> 20, the slot batch shrinks as rows end).
SCHEDULES = [(0, 64, 8), (3, 4, 1)]


@pytest.fixture(scope="module")
def model():
    graphdef, params = models.create(CFG, seed=1)
    params = jax.tree_util.tree_map_with_path(
        lambda k, x: x if "norm" in jax.tree_util.keystr(k) else x * 4.0, params
    )  # peaked outputs (weights, not norms)
    return graphdef, params


def _host(out):
    return jax.tree.map(np.asarray, out)


def _both(model, cfg, prompts=PROMPTS, seed=0, max_new_B=None, schedules=SCHEDULES):
    """(static sampler's output, [(engine, its output) per schedule])."""
    graphdef, params = model
    tokens, valid = left_pad(prompts, cfg.max_prompt_len, cfg.pad_id)
    key = jax.random.key(seed)
    want = _host(make_generate(graphdef, cfg)(params, tokens, valid, key, max_new_B))
    got = []
    for slots, min_bucket, min_slots in schedules:
        gen = engine.make_generate(
            graphdef, cfg, num_slots=slots, min_bucket=min_bucket, min_slots=min_slots
        )
        got.append((gen, _host(gen(params, tokens, valid, key, max_new_B))))
    return want, got


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype == np.float32:
            np.testing.assert_allclose(a[k], b[k], atol=2e-5, err_msg=k)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_greedy_equals_static_sampler_token_for_token(model):
    """Stop tokens, per-prompt and per-row budgets (some 0), two samples per prompt: every output of
    every schedule equals the static sampler's."""
    cfg = SamplingConfig(max_prompt_len=8, max_new_tokens=20, greedy=True, num_samples=2)
    ref = _host(make_generate(model[0], cfg)(model[1], *left_pad(PROMPTS, 8), jax.random.key(0)))
    stop = int(ref["response"][2, 5])  # a token some rows produce mid-way
    cfg = SamplingConfig(
        max_prompt_len=8, max_new_tokens=20, greedy=True, num_samples=2, stop_tokens=(stop, 60)
    )
    for budget in (jnp.asarray([20, 0, 13]), jnp.asarray([20, 0, 13, 4, 9, 17])):
        want, got = _both(model, cfg, max_new_B=budget)
        assert want["stopped"].any() and not want["stopped"].all()
        for _, out in got:
            _assert_same(want, out)
    for gen, _ in got:  # every shape compiled is one that AOT compilation would list
        assert set(gen.stats["shapes"]) <= set(gen.program_shapes(6))
    shapes = got[1][0].stats["shapes"]
    assert [n for _, n in shapes] == sorted(n for _, n in shapes), shapes
    assert {n for _, n in shapes} == {12, 16, 24, 28}, shapes  # the cache grew bucket by bucket
    assert shapes[0][0] == 3 and shapes[-1][0] == 1, shapes  # and the slot batch shrank


def test_prompts_in_passes_equal_one_pass(model):
    """`max_prompts`: the prompts go in passes of that many (the last padded to the same shape),
    each holding only its own prompts' prefix cache; greedy output, per-row and per-prompt
    budgets included, equals the static sampler's; the budget bounds the pass size."""
    from jaxtrace.rollout import layout

    cfg = SamplingConfig(max_prompt_len=8, max_new_tokens=10, greedy=True, num_samples=2)
    graphdef, params = model
    tokens, valid = left_pad(PROMPTS, 8)
    for budget in (None, jnp.asarray([10, 0, 7]), jnp.asarray([10, 3, 0, 1, 9, 10])):
        want = _host(make_generate(graphdef, cfg)(params, tokens, valid, jax.random.key(0), budget))
        gen = engine.make_generate(graphdef, cfg, max_prompts=2)
        assert gen.prompt_chunk(3) == 2
        _assert_same(want, _host(gen(params, tokens, valid, jax.random.key(0), budget)))
    # Sampled: a row keeps its key in any pass, so passes draw what one pass draws.
    hot = SamplingConfig(max_prompt_len=8, max_new_tokens=10, temperature=1.0, num_samples=2)
    one_pass = _host(engine.make_generate(graphdef, hot)(params, tokens, valid, jax.random.key(5)))
    passes = engine.make_generate(graphdef, hot, max_prompts=1)
    _assert_same(one_pass, _host(passes(params, tokens, valid, jax.random.key(5))))
    one_prompt = layout.slot_cache_bytes(CFG, 8) / layout.GIB
    assert layout.prompts_for_budget(CFG, 8, 0.0) == 0  # no budget: one pass
    assert layout.prompts_for_budget(CFG, 8, 12 * one_prompt) == 3  # a quarter of the budget
    assert layout.prompts_for_budget(CFG, 8, 12 * one_prompt, batch_shards=4) == 12
    assert layout.prompts_for_budget(CFG, 8, one_prompt, batch_shards=4) == 4  # >= 1 per shard
    sel = engine.select(graphdef, cfg, CFG, cache_budget_gib=12 * one_prompt)
    assert isinstance(sel, engine.Engine) and sel.max_prompts == 3


def test_sampled_logprobs_equal_full_forward_and_schedule_free(model):
    """Sampled rows: log-probs equal an uncached forward pass, and the rows do not depend on the
    slot count, the buckets or the schedule (per-row randomness)."""
    cfg = SamplingConfig(
        max_prompt_len=8, max_new_tokens=9, temperature=0.9, top_p=0.8, num_samples=3,
        stop_tokens=(7,),
    )  # fmt: skip
    _, got = _both(model, cfg, seed=3)
    first = got[0][1]
    for _, out in got[1:]:
        _assert_same(first, out)
    tokens = np.concatenate([first["prompt"], first["response"]], axis=1)
    valid = np.concatenate([first["prompt_valid"], first["response_mask"]], axis=1)
    logits = np.asarray(models.forward_logits(*model, tokens, valid))
    logp = jax.nn.log_softmax(logits[:, 7 : 7 + 9], -1)
    want = np.take_along_axis(np.asarray(logp), first["response"][..., None], -1)[..., 0]
    want = np.where(first["response_mask"], want, 0)
    np.testing.assert_allclose(first["logprobs"], want, atol=2e-5)
    assert len({tuple(r) for r in first["response"][:3]}) > 1  # a group's samples differ


def _top_p_probs(logits, temperature, top_p):
    """Reference sampling distribution (numpy): softmax(logits / T) on the smallest set of
    tokens with mass >= top_p, renormalised."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, bool)
    keep[order[before < top_p]] = True
    q = np.where(keep, p, 0)
    return q / q.sum()


def _chi2_ok(counts, p):
    live = p > 0
    assert counts[~live].sum() == 0, "a token with zero probability was drawn"
    expected = p[live] * counts.sum()
    chi2 = np.sum((counts[live] - expected) ** 2 / expected)
    dof = live.sum() - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)  # see test_sampler's chi-square


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_two_token_distribution_matches_the_model(temperature, top_p):
    """Chi-square of 6000 two-token samples from one prompt against the model: the first token
    against softmax at the prompt, the second against sum_a p(a) p(b | a) (a forward pass per
    first token), so the decode step's distribution is checked too. 3 slots: rows refill."""
    graphdef, params = models.create(CFG, seed=2)
    params = jax.tree_util.tree_map_with_path(
        lambda k, x: x if "norm" in jax.tree_util.keystr(k) else x * 2.0, params
    )  # weights, not norms
    prompt = [4, 8, 15]
    n = 6000
    cfg = SamplingConfig(
        max_prompt_len=3, max_new_tokens=2, temperature=temperature, top_p=top_p, num_samples=n
    )
    gen = engine.make_generate(graphdef, cfg, num_slots=512)
    out = _host(gen(params, *left_pad([prompt], 3), jax.random.key(7)))
    assert out["response_mask"].all()
    v = CFG.vocab_size
    base = np.asarray(models.forward_logits(graphdef, params, jnp.asarray([prompt])))[0, -1]
    p1 = _top_p_probs(base, temperature, top_p)
    seqs = jnp.asarray([prompt + [a] for a in range(v)])
    nxt = np.asarray(models.forward_logits(graphdef, params, seqs))[:, -1]
    p2 = sum(p1[a] * _top_p_probs(nxt[a], temperature, top_p) for a in range(v) if p1[a] > 0)
    _chi2_ok(np.bincount(out["response"][:, 0], minlength=v), p1)
    _chi2_ok(np.bincount(out["response"][:, 1], minlength=v), p2)


def test_short_rows_never_allocate_the_budget(model):
    """Rows that stop early decode over a cache of P + min_bucket slots, whatever the budget."""
    cfg = SamplingConfig(max_prompt_len=8, max_new_tokens=4096, greedy=True, num_samples=2)
    gen = engine.make_generate(model[0], cfg, min_bucket=16)
    tokens, valid = left_pad(PROMPTS, 8)
    out = _host(gen(model[1], tokens, valid, jax.random.key(0), jnp.asarray([5, 9, 12])))
    np.testing.assert_array_equal(out["length"], [5, 5, 9, 9, 12, 12])
    assert {length for _, length in gen.stats["shapes"]} == {8 + 16}
    short = SamplingConfig(max_prompt_len=8, max_new_tokens=12, greedy=True, num_samples=2)
    want = _host(make_generate(model[0], short)(model[1], tokens, valid, jax.random.key(0)))
    np.testing.assert_array_equal(out["response"][:, :12][out["response_mask"][:, :12]],
                                  want["response"][out["response_mask"][:, :12]])  # fmt: skip


def test_per_row_budgets_and_one_token(model):
    cfg = SamplingConfig(max_prompt_len=8, max_new_tokens=6, greedy=True, num_samples=2)
    per_row = jnp.asarray([6, 1, 0, 3, 2, 6])
    want, got = _both(model, cfg, max_new_B=per_row)
    np.testing.assert_array_equal(want["length"], [6, 1, 0, 3, 2, 6])
    for _, out in got:
        _assert_same(want, out)
    one = SamplingConfig(max_prompt_len=1, max_new_tokens=1, greedy=True)
    want, got = _both(model, one, prompts=[[7], [8]])
    for _, out in got:
        _assert_same(want, out)
    gen = engine.make_generate(model[0], cfg)
    with pytest.raises(ValueError, match=r"max_new_B has shape \(4,\)"):
        gen(model[1], *left_pad(PROMPTS, 8), jax.random.key(0), jnp.ones(4, jnp.int32))
    with pytest.raises(ValueError, match="prompt width 4 != max_prompt_len 8"):
        gen(model[1], *left_pad(PROMPTS[:1], 4), jax.random.key(0))
    with pytest.raises(ValueError, match="num_slots=-1"):
        engine.make_generate(model[0], cfg, num_slots=-1)


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
    prompt = [[4, 8, 15, 16, 23, 42], [1, 2, 3]]
    cfg = SamplingConfig(max_prompt_len=6, max_new_tokens=10, greedy=True)
    gen = engine.make_generate(graphdef, cfg, num_slots=1, min_bucket=2, min_slots=1)
    out = _host(gen(params, *left_pad(prompt, 6), jax.random.key(0)))
    with torch.no_grad():
        for i, ids in enumerate(prompt):
            want = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                pad_token_id=0,
            )[0, len(ids):].numpy()  # fmt: skip
            np.testing.assert_array_equal(out["response"][i], want)


def _moe_cfg(**kw):
    cfg = preset(
        "tiny",
        vocab_size=61,
        family="qwen3_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        mlp_only_layers=(0,),
        **kw,
    )
    return cfg.replace(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16)


@pytest.mark.parametrize("layers", [(0,), (0, 1)])  # mixed hybrid / attention, all hybrid
def test_hybrid_equals_static_sampler(model, layers):
    """Linear-attention layers keep a per-row state: refilled, compacted, never grown."""
    from jaxtrace.models.hybrid import linearize  # noqa: PLC0415

    hybrid = linearize(CFG, layers, hybrid_window=3)
    graphdef, _ = models.create(hybrid, seed=1)
    cfg = SamplingConfig(
        max_prompt_len=8, max_new_tokens=12, greedy=True, num_samples=2, stop_tokens=(7,)
    )
    want, got = _both((graphdef, model[1]), cfg, max_new_B=jnp.asarray([12, 5, 9, 2, 12, 7]),
                      schedules=[(3, 4, 1)])  # fmt: skip
    _assert_same(want, got[0][1])
    assert len({s for s, _ in got[0][0].stats["shapes"]}) > 1  # the slot batch shrank


def test_dropless_moe_equals_static_and_unsupported_models_are_rejected():
    graphdef, params = models.create(_moe_cfg(), seed=1)
    cfg = SamplingConfig(max_prompt_len=8, max_new_tokens=7, greedy=True, num_samples=2)
    want, got = _both((graphdef, params), cfg, schedules=[(2, 2, 1)])
    _assert_same(want, got[0][1])
    tokens, valid = left_pad(PROMPTS, 8)
    capped = models.create(_moe_cfg(moe_capacity_factor=1.0), seed=1)
    with pytest.raises(ValueError, match="moe_capacity_factor=1.0"):
        engine.make_generate(capped[0], cfg)(capped[1], tokens, valid, jax.random.key(0))


def test_the_token_major_slot_cache_equals_the_static_sampler(model, tpu_decode_order):
    """TPU stores the slot cache token-major between segments (`engine.slots_token_major`,
    forced here with TPU's layer scan; XLA:TPU would otherwise copy a head-major cache into its
    loop's layout every segment): every schedule - slots refilled, the cache grown 12 -> 28,
    the slot batch compacted - and a mixed hybrid model decode as the static sampler does."""
    from jaxtrace.models.hybrid import linearize  # noqa: PLC0415

    empty = engine._empty_slots(CFG, 3, 12)["cache"][0]["k"]
    assert empty.shape == (CFG.num_layers, 3, 12, CFG.num_kv_heads, CFG.head_dim)
    cfg = SamplingConfig(
        max_prompt_len=8, max_new_tokens=20, greedy=True, num_samples=2, stop_tokens=(60,)
    )
    want, got = _both(model, cfg, max_new_B=jnp.asarray([20, 0, 13, 4, 9, 17]))
    for _, out in got:
        _assert_same(want, out)
    shapes = got[1][0].stats["shapes"]
    assert {n for _, n in shapes} == {12, 16, 24, 28} and shapes[-1][0] == 1, shapes
    hybrid = models.create(linearize(CFG, (0,), hybrid_window=3), seed=1)[0]
    want, got = _both((hybrid, model[1]), cfg, schedules=[(3, 4, 1)])
    _assert_same(want, got[0][1])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)")
def test_on_the_mesh_equals_single_device(model):
    """Params replicated on an 8-device mesh and prompts split over its data axis decode as on
    one device."""
    from jaxtrace import sharding  # noqa: PLC0415

    graphdef, params = model
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    on_mesh = jax.device_put(params, sharding.replicated(mesh))
    prompts = PROMPTS + [[1, 2], [3], [4, 5, 6], [7, 7, 7, 7, 7], [9]]
    tokens, valid = left_pad(prompts, 8)
    cfg = SamplingConfig(max_prompt_len=8, max_new_tokens=6, temperature=1.0, num_samples=2)
    gen = engine.make_generate(graphdef, cfg, num_slots=4)
    want = _host(gen(params, tokens, valid, jax.random.key(3)))
    got = _host(gen(on_mesh, *sharding.shard_rows((tokens, valid), mesh), jax.random.key(3)))
    _assert_same(want, got)


def test_select_falls_back_to_the_static_sampler(caplog):
    """rollout.engine: 'continuous' gives the engine where it can decode the model, else the
    static sampler (logged); 'static' the static sampler; anything else an error."""
    from jaxtrace.rollout import select  # noqa: PLC0415

    graphdef, _ = models.create(CFG, seed=0)
    cfg = SamplingConfig(max_prompt_len=4, max_new_tokens=4, greedy=True)
    assert isinstance(select(graphdef, cfg, CFG, "continuous"), engine.Engine)
    assert not isinstance(select(graphdef, cfg, CFG, "static"), engine.Engine)
    capped = _moe_cfg(moe_capacity_factor=1.0)
    with caplog.at_level("WARNING"):
        gen = select(models.create(capped)[0], cfg, capped, "continuous")
    assert not isinstance(gen, engine.Engine)
    assert "falling back to the static sampler" in caplog.text
    with pytest.raises(ValueError, match="rollout engine 'paged'"):
        select(graphdef, cfg, CFG, "paged")


def _eqns(jaxpr):
    """Every equation of a jaxpr, sub-jaxprs (loop bodies, calls) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


@pytest.mark.parametrize("which", ["static", "engine"])
def test_cpu_decode_loop_reads_per_layer_weights_and_equals_the_layer_scan(
    model, which, monkeypatch
):
    """On CPU the decode loop runs on per-layer weights and caches sliced once before it
    (`models.unstacked_decode`): no equation inside it takes a stacked [L, ...] weight, which
    XLA:CPU would copy a layer of on every step. Its output equals the layer scan's (TPU's
    path, forced here), sampled and with ragged budgets."""
    import functools

    from jaxtrace.rollout import sampler

    graphdef, params = model
    cfg = SamplingConfig(max_prompt_len=8, max_new_tokens=9, temperature=1.0, num_samples=2)
    tokens, valid = left_pad(PROMPTS, 8)
    budget = jnp.asarray([9, 2, 5])
    jaxprs = []  # of the engine's segments, as called
    real = engine._segment_jit

    def spy(graphdef, cfg, *args, **static):
        fn = functools.partial(engine._segment, graphdef, cfg, **static)
        jaxprs.append(jax.make_jaxpr(fn)(*args))
        return real(graphdef, cfg, *args, **static)

    def run():
        if which == "static":
            return _host(make_generate(graphdef, cfg)(params, tokens, valid, key, budget))
        return _host(engine.make_generate(graphdef, cfg)(params, tokens, valid, key, budget))

    key = jax.random.key(3)
    monkeypatch.setattr(engine, "_segment_jit", spy)
    unstacked = run()
    monkeypatch.setattr(engine, "_segment_jit", real)
    if which == "static":
        fn = functools.partial(sampler.generate, graphdef, cfg=cfg, max_new_B=budget)
        jaxprs.append(jax.make_jaxpr(lambda p: fn(p, tokens, valid, key))(params))
    stacked_shapes = {x.shape for x in jax.tree.leaves(params["layers"])}
    loops = [e for j in jaxprs for e in _eqns(j.jaxpr) if e.primitive.name == "while"]
    assert loops
    for loop in loops:
        for eqn in _eqns(loop.params["body_jaxpr"].jaxpr):
            shapes = {tuple(getattr(v.aval, "shape", ())) for v in eqn.invars}
            assert not shapes & stacked_shapes, (eqn.primitive, shapes & stacked_shapes)
    from jaxtrace.models import qwen3

    monkeypatch.setattr(qwen3, "unstacked_decode", lambda: False)  # `decode_loop_layout`'s test
    jax.clear_caches()  # the module-level jits traced the unstacked loop
    _assert_same(unstacked, run())
