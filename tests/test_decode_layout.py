"""The rollout's decode layout (weights resharded once per RL step, optionally cast to the
compute dtype) and the cache budget (decode slots / row chunks derived from GiB per chip)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxtrace import models, sharding
from jaxtrace.config import DECODE_LAYOUTS, ConfigError, base, validate
from jaxtrace.models.config import preset
from jaxtrace.rollout import SamplingConfig, engine, layout, left_pad, make_generate, sampler

REPO = pathlib.Path(__file__).resolve().parents[1]
needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)")
CFG = preset(
    "tiny",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [3], [14, 15], [16], [17, 18, 19], [20, 21]]


def _host(out):
    return jax.tree.map(np.asarray, out)


def _mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def _expected_spec(layout_name, axes):
    """The spec a leaf with these logical axes gets, written out per layout (not via the rules)."""
    if layout_name == "replicated":
        return P(*([None] * len(axes)))
    to_tensor = {"vocab", "heads", "kv_heads", "mlp"}
    fsdp = {"embed"} if layout_name == "train" else set()
    return P(*("tensor" if a in to_tensor else "fsdp" if a in fsdp else None for a in axes))


def test_layout_names_agree():
    assert DECODE_LAYOUTS == sharding.DECODE_LAYOUTS
    with pytest.raises(ValueError, match="decode layout 'paged'"):
        sharding.decode_rules("paged")


@needs8
@pytest.mark.parametrize("name", ["train", "replicated", "tensor"])
def test_reshard_gives_the_layout_and_leaves_the_params_alone(name):
    mesh = _mesh()
    cfg = CFG.replace(dtype="bfloat16")  # fp32 params, bf16 compute: the copy is cast
    graphdef, params = sharding.init_sharded(cfg, mesh)
    before = _host(params)
    specs_before = jax.tree.map(lambda x: x.sharding.spec, params)
    reshard = layout.make_reshard(cfg, mesh, name, in_compute_dtype=True)
    copy = reshard(params)

    def check(axes, leaf):
        assert leaf.sharding.spec == _expected_spec(name, axes), (axes, leaf.sharding.spec)
        assert leaf.dtype == jnp.bfloat16

    jax.tree.map(check, models.logical_axes(cfg), copy, is_leaf=lambda x: isinstance(x, tuple))
    q = copy["layers"][0]["self_attn"]["q_proj"]  # [layers, d, heads, head_dim], layers stacked
    shard = q.addressable_shards[0].data.shape
    want = {"train": (32, 2, 16), "replicated": (64, 4, 16), "tensor": (64, 2, 16)}[name]
    assert shard == (CFG.num_layers, *want)
    # The training params: same values, dtype and placement, still alive.
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
        assert not a.is_deleted() and a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), b)
    assert jax.tree.map(lambda x: x.sharding.spec, params) == specs_before
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(copy)[0], np.float32),
        np.asarray(jax.tree.leaves(before)[0].astype(jnp.bfloat16), np.float32),
    )


def test_nothing_to_copy_and_cast_off():
    mesh = sharding.make_mesh({"data": -1})
    assert layout.make_reshard(CFG, mesh, "train") is None  # fp32 model, train layout
    assert layout.make_reshard(CFG, None, "replicated") is None  # no mesh, no cast
    bf16 = CFG.replace(dtype="bfloat16")
    assert layout.make_reshard(bf16, mesh, "train", in_compute_dtype=False) is None
    assert layout.decode_dtype(bf16, True) == jnp.bfloat16
    assert layout.decode_dtype(CFG.replace(param_dtype="bfloat16", dtype="bfloat16"), True) is None


def test_decode_weights_copy_once_per_params_until_released():
    calls = []
    weights = layout.DecodeWeights(lambda p: calls.append(1) or jax.tree.map(lambda x: x + 0, p))
    a = {"w": jnp.ones(3)}
    first = weights(a)
    assert weights(a) is first and len(calls) == 1  # every sampler call of one step
    b = {"w": jnp.zeros(3)}  # the params after an update
    assert weights(b) is not first and len(calls) == 2
    weights.release()
    weights(b)
    assert len(calls) == 3 and weights.copies == 3
    same = layout.DecodeWeights(None)
    assert same(a) is a
    gen = object()
    assert layout.in_decode_layout(gen, same) is gen


@needs8
@pytest.mark.parametrize(
    "engine_name, dtype, layouts",
    [
        ("continuous", "float32", ("replicated", "tensor")),
        ("static", "float32", ("replicated", "tensor")),
        ("continuous", "bfloat16", ("replicated",)),
    ],
)
def test_sampling_in_each_layout_equals_the_train_layout(engine_name, dtype, layouts):
    """Greedy decoding on each layout's copy equals decoding on the training (FSDP) params token
    for token, with log-probs to rounding; the bf16 copy of an fp32-stored bf16-compute model
    decodes as the fp32 params do (the model casts every weight to bf16 before use)."""
    mesh = _mesh()
    tokens, valid = left_pad(PROMPTS[:4], 8)
    placed = sharding.shard_rows((tokens, valid), mesh)
    cfg = SamplingConfig(max_prompt_len=8, max_new_tokens=5, greedy=True, num_samples=2)
    model_cfg = CFG.replace(dtype=dtype)
    graphdef, params = sharding.init_sharded(model_cfg, mesh, seed=1)
    gen = engine.select(graphdef, cfg, model_cfg, engine_name)
    want = _host(gen(params, *placed, jax.random.key(0)))
    assert want["length"].min() > 1
    for name in layouts:
        copy = layout.make_reshard(model_cfg, mesh, name)(params)
        assert jax.tree.leaves(copy)[0].dtype == model_cfg.compute_dtype
        got = _host(gen(copy, *placed, jax.random.key(0)))
        np.testing.assert_array_equal(got["response"], want["response"], err_msg=name)
        np.testing.assert_array_equal(got["response_mask"], want["response_mask"])
        atol = 1e-5 if dtype == "float32" else 2e-2
        np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=atol)


# ---------------------------------------------------------------------------- cache budget
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_slot_bytes_follow_the_formula(dtype):
    cfg = CFG.replace(dtype=dtype)
    itemsize = jnp.dtype(dtype).itemsize
    want = 2 * cfg.num_layers * cfg.num_kv_heads * 100 * cfg.head_dim * itemsize
    assert layout.slot_cache_bytes(cfg, 100) == want
    # Qwen3-1.7B at P + N = 512 + 8192 in bf16: 2 x 28 x 8 x 8704 x 128 x 2 bytes = 0.93 GiB.
    big = preset("qwen3_1p7b", dtype="bfloat16")
    assert layout.slot_cache_bytes(big, 8704) == 2 * 28 * 8 * 8704 * 128 * 2


def test_slots_for_budget():
    per = layout.slot_cache_bytes(CFG, 64)
    gib = per / layout.GIB
    assert layout.slots_for_budget(CFG, 64, 3.001 * gib, batch_shards=4) == 12
    assert layout.slots_for_budget(CFG, 64, 3 * gib * 0.999, batch_shards=4) == 8
    assert layout.slots_for_budget(CFG, 64, 0.0) == 0  # no budget
    with pytest.raises(ValueError, match="holds no decode slot"):
        layout.slots_for_budget(CFG, 64, 0.5 * gib)
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        layout.slots_for_budget(CFG, 64, -1.0)
    hybrid = CFG.replace(family="qwen3_hybrid", hybrid_layers=(1,))
    assert layout.slot_cache_bytes(hybrid, 64) != per  # a hybrid layer's state instead of KV


def test_engine_with_a_budget_uses_fewer_slots_and_the_same_output():
    """A budget of 3.5 slots' cache: the engine decodes 32 rows through at most 3 slots, in
    passes of the prompts whose prefix caches fit a quarter of the budget (here one, of 4
    rows), with the output of one slot per row (the engine's draws do not depend on the
    schedule or the passes)."""
    graphdef, params = models.create(CFG, seed=2)
    tokens, valid = left_pad(PROMPTS, 8)
    cfg = SamplingConfig(max_prompt_len=8, max_new_tokens=6, temperature=1.0, num_samples=4)
    gib = 3.5 * layout.slot_cache_bytes(CFG, 14) / layout.GIB
    gen = engine.select(graphdef, cfg, CFG, "continuous", cache_budget_gib=gib)
    assert gen.slot_cap(32) == 3 and gen.slot_cap(2) == 2 and gen.prompt_chunk(8) == 1
    ragged = np.arange(32, dtype=np.int32) % 6 + 1  # per-row budgets: slots free up early
    got = _host(gen(params, tokens, valid, jax.random.key(4), ragged))
    assert max(s for s, _ in gen.stats["shapes"]) == 3
    # 8 passes of 4 rows: 3 take the slots, 1 waits for a slot to free up.
    assert gen.stats["passes"] == 8 and gen.stats["segments"] > gen.stats["passes"]
    one_per_row = engine.make_generate(graphdef, cfg)
    want = _host(one_per_row(params, tokens, valid, jax.random.key(4), ragged))
    np.testing.assert_array_equal(want["length"], ragged)
    for k in want:  # log-probs to rounding: a pass prefills 1 prompt, one call all 8
        check = np.testing.assert_allclose if k == "logprobs" else np.testing.assert_array_equal
        check(got[k], want[k], err_msg=k, **({"atol": 1e-5} if k == "logprobs" else {}))
    override = engine.select(graphdef, cfg, CFG, "continuous", 5, cache_budget_gib=gib)
    assert override.slot_cap(32) == 5  # decode_slots > 0 overrides the budget
    with pytest.raises(ValueError, match="max_slots=-1 must be >= 0"):
        engine.Engine(graphdef, cfg, max_slots=-1)


def test_static_sampler_in_row_chunks():
    """The static sampler under a budget generates whole prompts in chunks; greedy output (and
    per-row budgets) equal the one-batch sampler's."""
    graphdef, params = models.create(CFG, seed=2)
    tokens, valid = left_pad(PROMPTS, 8)
    cfg = SamplingConfig(max_prompt_len=8, max_new_tokens=6, greedy=True, num_samples=2)
    limit = np.arange(16, dtype=np.int32) % 5 + 1  # per row
    gib = 5.5 * layout.slot_cache_bytes(CFG, 14) / layout.GIB
    chunked = engine.select(graphdef, cfg, CFG, "static", cache_budget_gib=gib)
    assert chunked.max_rows == 5 and sampler.chunk_prompts(5, 2) == 2
    whole = make_generate(graphdef, cfg)
    for max_new in (limit, limit[::2]):  # per row, per prompt
        want = _host(whole(params, tokens, valid, jax.random.key(0), max_new))
        got = _host(chunked(params, tokens, valid, jax.random.key(0), max_new))
        for k in want:  # log-probs: a batch of other rows rounds differently
            check = np.testing.assert_allclose if k == "logprobs" else np.testing.assert_array_equal
            check(got[k], want[k], err_msg=k, **({"atol": 1e-5} if k == "logprobs" else {}))
    assert sampler.chunk_prompts(64, 8, split=4) == 8
    assert sampler.chunk_prompts(40, 8, split=4) == 4
    assert sampler.chunk_prompts(24, 8, split=4) == 3  # fewer prompts than the split


@needs8
def test_slots_are_split_over_the_batch_axes():
    """On a mesh the engine's slot batch is split over the data axes, so a chip holds slots / d
    of the cache (when the slot count divides; else replicated)."""
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    _, params = sharding.init_sharded(CFG, mesh, seed=0)
    s = engine.slot_sharding(params, 16, CFG)
    assert s[0].spec == P(("data", "fsdp"))
    # cache [layers, slots, kv_heads, ...]: slots split, heads whole (no tensor axis)
    assert [c.spec for c in s[1]] == [P(None, ("data", "fsdp"), None)] * CFG.scan_period
    assert engine.slot_sharding(params, 12, CFG) is None
    assert engine.slot_sharding({"w": jnp.ones(4)}, 16, CFG) is None  # one device
    slots = engine._placed("empty", s)(CFG, 16, 24)
    k = slots["cache"][0]["k"]
    layers = CFG.num_layers // CFG.scan_period
    assert k.addressable_shards[0].data.shape == (layers, 2, CFG.num_kv_heads, 24, CFG.head_dim)
    assert slots["t"].addressable_shards[0].data.shape == (2,)


@needs8
def test_tensor_layout_splits_the_slot_cache_over_kv_heads():
    """In the tensor layout a chip holds only its KV heads' slot cache (the heads its attention
    computes), and the cache budget counts that: twice the slots at a 2-way head split."""
    mesh = _mesh()  # data 2, fsdp 2, tensor 2
    _, params = sharding.init_sharded(CFG, mesh, seed=0)
    copy = layout.make_reshard(CFG, mesh, "tensor")(params)
    assert engine.kv_head_axes(copy, CFG) == "tensor"
    assert engine.kv_head_shards(copy, CFG) == 2 == layout.kv_head_shards(CFG, mesh, "tensor")
    replicated = layout.make_reshard(CFG, mesh, "replicated")(params)
    assert engine.kv_head_axes(replicated, CFG) is None
    assert engine.kv_head_shards(replicated, CFG) == 1
    assert layout.kv_head_shards(CFG, mesh, "replicated") == 1
    assert layout.kv_head_shards(CFG, None, "tensor") == 1
    s = engine.slot_sharding(copy, 8, CFG)
    assert [c.spec for c in s[1]] == [P(None, ("data", "fsdp"), "tensor")] * CFG.scan_period
    k = engine._placed("empty", s)(CFG, 8, 24)["cache"][0]["k"]
    layers = CFG.num_layers // CFG.scan_period
    assert k.addressable_shards[0].data.shape == (layers, 2, 1, 24, CFG.head_dim)
    # The budget: per-chip slot bytes halve, so the same GiB hold twice the slots.
    per = layout.slot_cache_bytes(CFG, 64)
    assert layout.slot_cache_bytes(CFG, 64, head_shards=2) == per // 2
    gib = 3.001 * per / layout.GIB
    assert layout.slots_for_budget(CFG, 64, gib, batch_shards=4, head_shards=2) == 24
    assert layout.prompts_for_budget(CFG, 64, gib / layout.PREFIX_SHARE, 4, 2) == 24
    gen = engine.select(
        models.create(CFG, 0)[0],
        SamplingConfig(max_prompt_len=8, max_new_tokens=56, greedy=True),
        CFG,
        cache_budget_gib=gib,
        batch_shards=4,
        head_shards=2,
    )
    assert gen.max_slots == 24
    hybrid = CFG.replace(family="qwen3_hybrid", hybrid_layers=(1,))
    state = layout.slot_cache_bytes(hybrid, 64) - per // 2  # the hybrid layer's state
    assert layout.slot_cache_bytes(hybrid, 64, head_shards=2) == per // 4 + state


def test_the_token_major_slot_cache_splits_its_heads_and_decodes_the_same(tpu_decode_order):
    """TPU's stored slot cache (`engine.slots_token_major`, forced here with TPU's layer scan):
    [layers, slots, length, Hkv, Dh] with the heads split on axis 3, a chip's shard 1 of 2
    heads; greedy decoding on the tensor layout's copy equals the train layout's."""
    mesh = _mesh()
    graphdef, params = sharding.init_sharded(CFG, mesh, seed=1)
    copy = layout.make_reshard(CFG, mesh, "tensor")(params)
    s = engine.slot_sharding(copy, 8, CFG)
    assert [c.spec for c in s[1]] == [P(None, ("data", "fsdp"), None, "tensor")] * CFG.scan_period
    k = engine._placed("empty", s)(CFG, 8, 24)["cache"][0]["k"]
    layers = CFG.num_layers // CFG.scan_period
    assert k.shape == (layers, 8, 24, CFG.num_kv_heads, CFG.head_dim)
    assert k.addressable_shards[0].data.shape == (layers, 2, 24, 1, CFG.head_dim)
    tokens, valid = left_pad(PROMPTS[:4], 8)
    placed = sharding.shard_rows((tokens, valid), mesh)
    cfg = SamplingConfig(max_prompt_len=8, max_new_tokens=5, greedy=True, num_samples=2)
    gen = engine.select(graphdef, cfg, CFG, "continuous")
    want = _host(gen(params, *placed, jax.random.key(0)))
    got = _host(gen(copy, *placed, jax.random.key(0)))
    np.testing.assert_array_equal(got["response"], want["response"])
    np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-5)


def test_a_prompt_copy_gathers_within_each_chip():
    """`engine.take_prompts` with the slots and the prefix both split over the 4 batch chips:
    each slot takes a prompt its chip holds, the copy under shard_map has no all-gather and
    equals the plain gather; the plain gather (no placement) all-gathers the prefix."""
    mesh = _mesh()
    split = jax.sharding.NamedSharding(mesh, P(None, ("data", "fsdp"), "tensor"))
    prefix = jnp.arange(2 * 8 * 2 * 5 * 4, dtype=jnp.float32).reshape(2, 8, 2, 5, 4)
    prefix = jax.device_put(prefix, split)
    # 16 slots in 4 runs of 4, each run's slots taking the run's 2 prompts in any order.
    src = np.array([1, 0, 0, 1, 2, 3, 3, 2, 5, 4, 4, 5, 7, 6, 6, 7], np.int32)
    placed_src = jax.device_put(src, jax.sharding.NamedSharding(mesh, P(("data", "fsdp"))))
    for placement, gathers in ((split, False), (None, True)):
        take = jax.jit(
            lambda p, s, placed=placement: engine.take_prompts(p, s, placed), out_shardings=split
        )
        hlo = take.lower(prefix, placed_src).compile().as_text()
        assert ("all-gather" in hlo) is gathers, placement
        np.testing.assert_array_equal(take(prefix, placed_src), np.asarray(prefix)[:, src])


@pytest.mark.parametrize("order", ["model", "token_major"])
def test_slots_take_prompts_from_their_own_chip_and_decode_the_same(order, request):
    """The engine on the tensor layout's copy with 8 slots over 4 batch chips: the prefix is
    split like the slots (`engine.prompt_runs`), every segment copies prompts within each chip
    (prompt_runs 4), and with samples waiting for slots, refills, ragged budgets and compaction
    the output equals one device's; in the model's cache order (CPU) and TPU's token-major
    stored order (`tpu_decode_order`)."""
    if order == "token_major":
        request.getfixturevalue("tpu_decode_order")
    mesh = _mesh()
    graphdef, params = sharding.init_sharded(CFG, mesh, seed=1)
    copy = layout.make_reshard(CFG, mesh, "tensor")(params)
    groups, placement = engine.prompt_runs(copy, CFG, 8, 8)
    heads = (None, "tensor") if order == "token_major" else ("tensor",)
    assert groups == 4
    assert [s.spec for s in placement] == [P(None, ("data", "fsdp"), *heads)] * CFG.scan_period
    assert engine.prompt_runs(copy, CFG, 6, 8) == (1, None)  # prompts do not split
    cfg = SamplingConfig(max_prompt_len=8, max_new_tokens=12, temperature=1.0, num_samples=2)
    tokens, valid = left_pad(PROMPTS, 8)
    budget = np.array([12, 3, 7, 1, 9, 2, 12, 5])
    key = jax.random.key(5)
    gen = engine.make_generate(graphdef, cfg, num_slots=8, min_bucket=4, min_slots=2)
    want = _host(gen(jax.device_get(params), tokens, valid, key, budget))
    assert set(gen.stats["prompt_runs"]) == {1}
    got = _host(gen(copy, tokens, valid, key, budget))  # host prompts: the engine splits them
    runs = gen.stats["prompt_runs"]
    assert runs[0] == 4 and len(runs) > 2 and gen.stats["shapes"][-1][0] < 8, gen.stats
    np.testing.assert_array_equal(got["response"], want["response"])
    np.testing.assert_array_equal(got["length"], want["length"])
    np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-5)


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "key, value, match",
    [
        ("decode_layout", "paged", "rollout.decode_layout='paged'"),
        ("cache_budget_gib", -1.0, "rollout.cache_budget_gib=-1.0 must be >= 0"),
        ("cache_budget_gib", 1e-9, "holds no decode slot"),
        ("decode_slots", -2, "rollout.decode_slots=-2 must be >= 0"),
    ],
)
def test_bad_values_fail_validation(key, value, match):
    c = base()
    c.rollout[key] = value
    with pytest.raises(ConfigError, match=match):
        validate(c)


def test_a_small_budget_is_fine_when_decode_slots_is_set():
    c = base()
    c.rollout.update(cache_budget_gib=1e-9, decode_slots=4)
    validate(c)


@needs8
@pytest.mark.slow
def test_trainer_end_to_end_in_the_replicated_layout(tmp_path):
    """`jaxtrace.train` with `--config.rollout.decode_layout=replicated` on an FSDP mesh (a tiny
    model, 2 RL steps, subprocess): rollouts, self-annotation and eval decode on the copy."""
    overrides = {
        "workdir": str(tmp_path),
        "model.hidden_size": 32,
        "model.intermediate_size": 64,
        "model.num_layers": 2,
        "model.num_heads": 2,
        "model.num_kv_heads": 1,
        "model.head_dim": 16,
        "data.num_train": 64,
        "data.num_test": 8,
        "sft.steps": 2,
        "sft.batch_size": 8,
        "rollout.prompts_per_step": 2,
        "rollout.group_size": 4,
        "rollout.max_new_tokens": 40,
        "rollout.decode_layout": "replicated",
        "algo.annotator": "self",
        "train.steps": 2,
        "train.progress": False,
        "eval.batch_size": 8,
        "mesh.data": 4,
        "mesh.fsdp": 2,
    }
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "jaxtrace.train", "--config=configs/tiny.py"]
        + [f"--config.{k}={v}" for k, v in overrides.items()],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "samplers decode on a per-step copy of the weights: layout replicated" in out.stderr
    results = json.load(open(tmp_path / "results.json"))
    assert results["steps"] == 2 and "after" in results and "before" in results
    # One copy per eval (before, after) and per RL step, shared by its rollout and annotation.
    assert results["decode_copies"] == 4
