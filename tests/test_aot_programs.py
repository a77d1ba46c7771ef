"""`jaxtrace.aot.programs`: the programs a run executes, at the config's shapes, on a mesh (here
8 CPU devices; the TPU compiles are tests/test_tpu_compile.py)."""

import jax
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
