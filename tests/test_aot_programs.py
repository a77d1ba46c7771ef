"""`jaxtrace.aot.programs`: the programs a run executes, at the config's shapes, on a mesh (here
8 CPU devices; the TPU compiles are tests/test_tpu_compile.py)."""

import jax
import jax.numpy as jnp
import pytest

from jaxtrace import aot, sharding
from jaxtrace.config import base


def _programs(**changes):
    c = base()
    c.rollout.update(prompts_per_step=8, group_size=4, max_new_tokens=12)
    for key, value in changes.items():
        section, name = key.split("__")
        c[section][name] = value
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:8])
    return {p.name: p for p in aot.programs(aot.with_placeholders(c), mesh)}


def test_trace_compiles_both_teacher_phases_and_the_samplers():
    progs = _programs()
    samplers = {
        f"{s}_{part}" for s in ("sampler", "eval_sampler") for part in ("prefill", "decode")
    }
    assert set(progs) == {"rl_step+teacher", "rl_step"} | samplers
    state, batch, _, teacher = progs["rl_step+teacher"].args
    assert teacher is True and batch["response"].shape == (32, 12)
    assert batch["prompt"].shape == (8, 40) and batch["privileged"].shape == (32, 88)
    assert progs["rl_step"].args[1].keys() == {
        "prompt", "prompt_valid", "response", "response_mask", "advantages", "route"
    }  # fmt: skip
    assert batch["response"].sharding.spec[0] is not None  # split over the data axes


@pytest.mark.parametrize(
    "changes, names",
    [
        ({"algo__name": "grpo"}, {"rl_step"}),
        ({"algo__name": "opsd"}, {"rl_step+teacher"}),
        ({"algo__annotator": "divergence"}, {"rl_step+teacher", "rl_step", "divergence"}),
        ({"sft__steps": 5}, {"sft_step", "rl_step+teacher", "rl_step"}),
    ],
)
def test_programs_follow_the_algorithm(changes, names):
    assert {n for n in _programs(**changes) if "sampler" not in n} == names


def test_static_engine_is_one_sampler_program():
    progs = _programs(rollout__engine="static")
    assert {"sampler", "eval_sampler"} <= set(progs) and "sampler_decode" not in progs


def test_engine_programs_compile_on_cpu():
    """The continuous engine's prefill and largest decode segment, as the AOT tool builds them,
    compile (here for the 8 CPU devices)."""
    c = base()
    c.model.num_layers = 1
    c.rollout.update(prompts_per_step=8, group_size=2, max_new_tokens=8)
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:8])
    progs = {p.name: p for p in aot.programs(aot.with_placeholders(c), mesh)}
    for name in ("sampler_prefill", "sampler_decode"):
        result = aot.compile_program(progs[name], mesh)
        assert result.status == "ok", result.message


def test_ppo_minibatches_and_reference_kl():
    progs = _programs(algo__num_minibatches=2, algo__ppo_epochs=2, algo__ref_kl_coef=0.04)
    assert {"logprobs", "teacher_hidden"} <= set(progs)
    _, batch, _, _ = progs["rl_step+teacher"].args
    assert batch["response"].shape == (16, 12) and batch["prompt"].shape == (4, 40)
    assert {"old_logp", "ref_logp", "teacher_hidden"} <= set(batch)
    params = progs["rl_step"].args[0]["params"]
    per_device = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))  # replicated
    assert progs["rl_step"].resident_bytes == per_device  # the frozen reference's copy
    assert _programs()["rl_step"].resident_bytes == 0


def test_shipped_tpu_configs_validate():
    """Every shipped config passes validation as `jaxtrace.compile` runs it (the preset-filled
    algorithm keys are None until resolved)."""
    import importlib.util
    import pathlib

    from jaxtrace.config import validate

    for path in sorted(pathlib.Path(__file__).parents[1].glob("configs/*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        validate(aot.with_placeholders(module.get_config()))


def _fsdp_programs(axes=None, **rollout):
    """The programs on a 2 (data) x 4 (fsdp) mesh (or `axes`) of a 1-layer bf16-compute model."""
    c = base()
    c.model.update(num_layers=1, dtype="bfloat16")
    c.rollout.update(prompts_per_step=8, group_size=4, max_new_tokens=12, **rollout)
    mesh = sharding.make_mesh(axes or {"data": 2, "fsdp": 4}, jax.devices()[:8])
    return {p.name: p for p in aot.programs(aot.with_placeholders(c), mesh)}, mesh


def test_samplers_run_on_the_decode_copy_with_the_training_state_resident():
    """decode_layout=replicated: a reshard program, the samplers' params whole on every chip and
    in bf16, and the training state (params + optimizer moments) counted beside them."""
    progs, mesh = _fsdp_programs(decode_layout="replicated")
    state = progs["rl_step"].args[0]
    params = progs["sampler_decode"].args[0]
    assert all(not any(x.sharding.spec) for x in jax.tree.leaves(params))  # replicated
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(state["params"]))
    held = aot._per_device_bytes(state)
    for name in ("sampler_prefill", "sampler_decode", "eval_sampler_decode"):
        assert progs[name].resident_bytes == held, name
    reshard = progs["decode_reshard"]
    assert reshard.resident_bytes == held - aot._per_device_bytes(state["params"])
    for name in ("decode_reshard", "sampler_decode"):
        result = aot.compile_program(progs[name], mesh)
        assert result.status == "ok", result.message
    # The train layout without a cast: no copy, the samplers take the training params.
    progs, _ = _fsdp_programs(decode_in_compute_dtype=False)
    assert "decode_reshard" not in progs
    assert progs["sampler_decode"].args[0] is progs["rl_step"].args[0]["params"]
    held = aot._per_device_bytes(progs["rl_step"].args[0])
    params_bytes = aot._per_device_bytes(progs["sampler_decode"].args[0])
    assert progs["sampler_decode"].resident_bytes == held - params_bytes


def test_the_cache_budget_sets_the_compiled_slots_and_row_chunks():
    """3.5 slots' cache per chip (3 slots) on 8 batch shards: the engine's largest segment has
    24 slots (of 32 rows); the static sampler compiles one chunk of 24 rows = 6 prompts (fewer
    than the 8-way split, so not rounded to it)."""
    from jaxtrace.config import model_config  # noqa: PLC0415
    from jaxtrace.rollout import layout  # noqa: PLC0415

    c = base()
    c.model.update(num_layers=1, dtype="bfloat16")
    per_slot = layout.slot_cache_bytes(model_config(c), 40 + 12)
    gib = 3.5 * per_slot / layout.GIB
    progs, mesh = _fsdp_programs(cache_budget_gib=gib)
    assert progs["sampler_decode"].args[1]["t"].shape == (24,)
    # Compiled, a chip's arguments hold its 3 slots' cache, not all 24.
    result = aot.compile_program(progs["sampler_decode"], mesh)
    assert result.status == "ok", result.message
    assert 3 * per_slot <= result.argument_bytes < 24 * per_slot
    progs, _ = _fsdp_programs(cache_budget_gib=gib, engine="static")
    assert progs["sampler"].args[1].shape == (6, 40)


def test_the_tensor_layout_budget_counts_the_kv_head_split():
    """decode_layout=tensor on a data 2 x fsdp 2 x tensor 2 mesh: each slot's cache is split
    over the 2 KV heads as the weights are, so a budget of 3.5 whole slots' cache holds 7 per
    chip, 28 slots on the 4 batch shards, and a chip's share of the compiled cache is 7 halves."""
    from jaxtrace.config import model_config  # noqa: PLC0415
    from jaxtrace.rollout import layout  # noqa: PLC0415

    c = base()
    c.model.update(num_layers=1, dtype="bfloat16")
    per_slot = layout.slot_cache_bytes(model_config(c), 40 + 12)
    gib = 3.5 * per_slot / layout.GIB
    axes = {"data": 2, "fsdp": 2, "tensor": 2}
    progs, mesh = _fsdp_programs(axes, cache_budget_gib=gib, decode_layout="tensor")
    slots = progs["sampler_decode"].args[1]
    assert slots["t"].shape == (28,)
    assert aot._per_device_bytes(slots["cache"]) == 7 * per_slot // 2
    assert "tensor" in str(slots["cache"][0]["k"].sharding.spec)
    result = aot.compile_program(progs["sampler_decode"], mesh)
    assert result.status == "ok", result.message


def test_optimizer_moments_are_placed_like_their_params():
    """The abstract optimizer state (AdamW's two moments) is FSDP-sharded as the trainer's is
    (`optimizer.init` on placed params), not counted whole per chip."""
    progs, _ = _fsdp_programs()
    state = progs["rl_step"].args[0]
    params, moments = aot._per_device_bytes(state["params"]), state["opt_state"]
    assert all(x.sharding is not None for x in jax.tree.leaves(moments))
    assert params < aot._per_device_bytes(moments) <= 2 * params + 64  # + the step counters
