"""Micro-batched steps (jaxtrace.microbatch) equal the full-batch step: loss, every metric, the
gradients and the optimizer update, for 2 and 4 micro-batches, with each loss normalisation,
TRACE's teacher routes, the shared-prompt layout, MoE balancing, SFT and the forward passes.

The reference is the same step with micro_batch_rows=0 (one pass over the whole batch), an
independent code path: no scan, denominators from the batch itself."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrace import microbatch, models, sharding, steps
from jaxtrace.losses import trace as trace_lib
from tests.test_moe_model_sharding import _cfg as moe_config
from tests.test_sharding import CFG as DENSE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G, K, P, Q, N = 4, 2, 5, 6, 7  # 4 groups of 2 responses: 8 rows, micro-batches of 4 or 2 rows
ROWS = G * K


def _batch(vocab, *, k=K, shared=True, teacher=False, padded_group=False, seed=0):
    """An RL batch with ragged left-padded prompts, ragged responses (one empty), routes of every
    kind when `teacher`, and `padded_group`: group 0 entirely padding (with 4 micro-batches one
    of them has no valid token)."""
    rng = np.random.default_rng(seed)
    r = G * k
    prompt = rng.integers(1, vocab, (G, P)).astype(np.int32)
    prompt_valid = np.arange(P)[None, :] >= rng.integers(0, P - 1, G)[:, None]
    lengths = np.resize([N, 4, 0, 1, N, 6, 3, 5], r)
    if padded_group:
        lengths[:k] = 0
    mask = np.arange(N)[None, :] < lengths[:, None]
    response = np.where(mask, rng.integers(1, vocab, (r, N)), 0).astype(np.int32)
    correct = rng.random(r) > 0.5
    key_mask = mask & (rng.random((r, N)) > 0.5) if teacher else None
    err_mask = mask & (rng.random((r, N)) > 0.5) if teacher else None
    route = trace_lib.token_routes(
        mask,
        key_mask,
        err_mask,
        correct if teacher else None,
        fkl_on_key_spans=True,
        rkl_on_error_spans=True,
    )
    batch = {
        "prompt": prompt,
        "prompt_valid": prompt_valid,
        "response": response,
        "response_mask": mask,
        "advantages": rng.standard_normal(r).astype(np.float32),
        "route": np.asarray(route),
    }
    if not shared:
        for key in ("prompt", "prompt_valid"):
            batch[key] = np.repeat(batch[key], k, axis=0)
    if teacher:
        batch["privileged"] = rng.integers(1, vocab, (r, Q)).astype(np.int32)
        batch["privileged_valid"] = np.arange(Q)[None, :] >= rng.integers(0, Q - 1, r)[:, None]
    return batch


def _off_policy(graphdef, params, batch, seed=1):
    """old_logp / ref_logp away from the current policy, so clip fractions, ratios, approx_kl and
    the reference KL are not trivial."""
    logp = np.asarray(steps.make_logprob_fn(graphdef)(params, batch))
    rng = np.random.default_rng(seed)
    noise = lambda: rng.normal(0, 0.4, logp.shape).astype(np.float32)  # noqa: E731
    mask = batch["response_mask"]
    return {
        **batch,
        "old_logp": np.where(mask, logp + noise(), 0.0),
        "ref_logp": np.where(mask, logp + noise(), 0.0),
    }


def _close(got, want, tol, what):
    """Leafwise: within tol of the leaf's own scale (float32 sums in another order)."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, f"{what}{jax.tree_util.keystr(path)}: {a.shape} vs {b.shape}"
        scale = max(float(np.max(np.abs(b))), 1e-6) if b.size else 1.0
        err = float(np.max(np.abs(a - b))) if b.size else 0.0
        assert err <= tol * scale, f"{what}{jax.tree_util.keystr(path)}: {err} vs scale {scale}"


def _rl_run(cfg, loss_cfg, batch, micro_batch_rows, use_teacher, lam=0.5, mesh=None):
    """(metrics, update = old params - new params) of one SGD(lr=1) RL step: the update is
    minus the gradient, so it compares the gradients and the optimizer update at once. With
    `mesh`: state replicated, batch rows split over it, run under `jax.set_mesh`."""
    graphdef, params = models.create(cfg, 0)
    before = jax.tree.map(np.asarray, params)
    opt = optax.sgd(1.0)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}
    step = steps.make_rl_step(graphdef, opt, loss_cfg, micro_batch_rows)
    if mesh is not None:
        state = jax.device_put(state, sharding.replicated(mesh))
        batch = sharding.shard_step_batch(batch, mesh)
    with sharding.mesh_context(mesh):
        state, metrics = step(state, batch, jnp.float32(lam), use_teacher)
    update = jax.tree.map(lambda a, b: a - np.asarray(b), before, state["params"])
    return jax.device_get(metrics), update


def _assert_micro_equals_full(cfg, loss_cfg, batch, use_teacher, lam=0.5, sizes=(4, 2)):
    want_m, want_u = _rl_run(cfg, loss_cfg, batch, 0, use_teacher, lam)
    assert bool(want_m["finite"])
    assert max(float(np.max(np.abs(u))) for u in jax.tree.leaves(want_u)) > 0  # it trained
    for rows in sizes:
        got_m, got_u = _rl_run(cfg, loss_cfg, batch, rows, use_teacher, lam)
        assert set(got_m) == set(want_m)
        for key in want_m:
            np.testing.assert_allclose(
                float(got_m[key]), float(want_m[key]), rtol=2e-5, atol=2e-6, err_msg=key
            )
        _close(got_u, want_u, 1e-4, f"update with {rows}-row micro-batches ")
    return want_m


def _dense_graphdef():
    return models.create(DENSE, 0)


@pytest.mark.parametrize("norm, sizes", [("token", (4, 2)), ("sequence", (4,)), ("constant", (4,))])
def test_grpo_step_equals_full_batch(norm, sizes):
    graphdef, params = _dense_graphdef()
    batch = _off_policy(graphdef, params, _batch(DENSE.vocab_size))
    loss_cfg = steps.LossConfig(mode="grpo", norm=norm, max_len=N + 3, ref_kl_coef=0.1)
    m = _assert_micro_equals_full(DENSE, loss_cfg, batch, False, sizes=sizes)
    assert 0 < float(m["clip_frac"]) < 1 and float(m["ref_kl"]) > 0  # the metrics are not trivial


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (tests/conftest.py)")
def test_step_on_a_mesh_equals_full_batch():
    """Rows split over 4 data-parallel devices: micro-batches of 4 rows (constrained to the data
    axis) and of 2 rows (too few to split: left to XLA) equal the unsharded full-batch step."""
    graphdef, params = _dense_graphdef()
    batch = _off_policy(graphdef, params, _batch(DENSE.vocab_size))
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:4])
    loss_cfg = steps.LossConfig(mode="grpo", norm="sequence")
    want_m, want_u = _rl_run(DENSE, loss_cfg, batch, 0, False)
    for rows in (4, 2):
        got_m, got_u = _rl_run(DENSE, loss_cfg, batch, rows, False, mesh=mesh)
        for key in ("loss", "grad_norm", "clip_frac", "entropy"):
            np.testing.assert_allclose(float(got_m[key]), float(want_m[key]), rtol=2e-5)
        _close(got_u, want_u, 1e-4, f"mesh update ({rows} rows) ")


def test_grpo_step_unshared_prompts_equals_full_batch():
    """G == R (every response with its own prompt row): micro-batches of any row count."""
    graphdef, params = _dense_graphdef()
    batch = _off_policy(graphdef, params, _batch(DENSE.vocab_size, shared=False))
    loss_cfg = steps.LossConfig(mode="grpo", norm="token")
    _assert_micro_equals_full(DENSE, loss_cfg, batch, False, sizes=(4, 1))


def test_trace_step_with_teacher_equals_full_batch():
    """TRACE with FKL and RKL routes, the teacher pass inside the step, and one micro-batch (of
    4) that is all padding."""
    graphdef, params = _dense_graphdef()
    batch = _batch(DENSE.vocab_size, teacher=True, padded_group=True)
    route = batch["route"]
    assert (route == trace_lib.ROUTE_FKL).any() and (route == trace_lib.ROUTE_RKL).any()
    batch = _off_policy(graphdef, params, batch)
    m = _assert_micro_equals_full(DENSE, steps.LossConfig(mode="trace"), batch, True)
    assert float(m["kl_fkl_mean"]) > 0 and float(m["kl_rkl_mean"]) > 0
    assert float(m["n_fkl_tokens"]) > 0 and float(m["frac_rkl"]) > 0


def test_trace_step_lambda_zero_fallback_equals_full_batch():
    """lam = 0: KL-routed tokens fall back to GRPO (the denominators follow lam)."""
    graphdef, params = _dense_graphdef()
    batch = _off_policy(graphdef, params, _batch(DENSE.vocab_size, teacher=True))
    loss_cfg = steps.LossConfig(mode="trace", norm="sequence")
    _assert_micro_equals_full(DENSE, loss_cfg, batch, False, lam=0.0, sizes=(4,))


@pytest.mark.parametrize("global_lbl", [False, True])
def test_moe_step_equals_full_batch(global_lbl):
    """The load-balancing loss (f_i over the whole batch, from the pre-pass) and the moe/*
    metrics stay exact. With global_lbl the advantages are 0, so the whole gradient is the
    balancing loss's and the comparison of updates checks its micro-batch shares alone."""
    cfg = moe_config().replace(router_aux_loss_coef=0.5, moe_global_lbl=global_lbl)
    graphdef, params = models.create(cfg, 0)
    batch = _off_policy(graphdef, params, _batch(cfg.vocab_size, padded_group=True))
    if global_lbl:
        batch["advantages"] = np.zeros_like(batch["advantages"])
    sizes = (4,) if global_lbl else (4, 2)
    m = _assert_micro_equals_full(cfg, steps.LossConfig(mode="grpo"), batch, False, sizes=sizes)
    assert float(m["moe/lbl_loss"]) > 0 and "moe/load_imbalance_layer1" in m
    assert "moe/load_imbalance_layer0" not in m  # layer 0 is dense


def test_sft_step_equals_full_batch():
    cfg = moe_config().replace(router_aux_loss_coef=0.5)
    graphdef, _ = models.create(cfg, 0)
    batch = _batch(cfg.vocab_size, shared=False, padded_group=True)
    batch = {k: batch[k] for k in ("prompt", "prompt_valid", "response", "response_mask")}

    def run(rows):
        _, params = models.create(cfg, 0)
        before = jax.tree.map(np.asarray, params)
        opt = optax.sgd(1.0)
        state = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}
        state, m = steps.make_sft_step(graphdef, opt, rows)(state, batch)
        return jax.device_get(m), jax.tree.map(
            lambda a, b: a - np.asarray(b), before, state["params"]
        )

    want_m, want_u = run(0)
    for rows in (4, 2):
        got_m, got_u = run(rows)
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(float(got_m[key]), float(want_m[key]), rtol=2e-5)
        _close(got_u, want_u, 1e-4, f"sft update ({rows} rows) ")


def test_forward_passes_equal_full_batch():
    """log-probs, teacher hidden states and the divergence in micro-batches, rows in order."""
    graphdef, params = _dense_graphdef()
    batch = _batch(DENSE.vocab_size, teacher=True)
    for make in (
        steps.make_logprob_fn,
        steps.make_teacher_hidden_fn,
        steps.make_divergence_fn,
    ):
        want = np.asarray(make(graphdef)(params, batch))
        for rows in (4, 2):
            got = np.asarray(make(graphdef, micro_batch_rows=rows)(params, batch))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=make.__name__)


def test_split_merge_keep_groups_together():
    """Micro-batch i holds groups i, i + M, ... with their prompt rows; merge inverts split."""
    batch = {
        "prompt": np.arange(G)[:, None] * np.ones((1, 3), int),
        "response": np.repeat(np.arange(G), K)[:, None] * np.ones((1, 2), int),
    }
    parts = microbatch.split(batch, 2)
    assert parts["prompt"].shape == (2, 2, 3) and parts["response"].shape == (2, 4, 2)
    np.testing.assert_array_equal(parts["prompt"][1, :, 0], [1, 3])
    np.testing.assert_array_equal(parts["response"][1, :, 0], [1, 1, 3, 3])
    np.testing.assert_array_equal(microbatch.merge(parts["response"], G), batch["response"])
    assert microbatch.count(_batch(64), 0) == microbatch.count(_batch(64), ROWS) == 1


@pytest.mark.parametrize(
    "rows, message", [(3, "does not divide the batch's 8 rows"), (1, "multiple of the group size")]
)
def test_bad_micro_batch_rows_raise(rows, message):
    graphdef, params = _dense_graphdef()
    opt = optax.sgd(1.0)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}
    step = steps.make_rl_step(graphdef, opt, steps.LossConfig(mode="grpo"), rows)
    with pytest.raises(ValueError, match=f"train.micro_batch_rows={rows} .*{message}"):
        step(state, _batch(DENSE.vocab_size), jnp.float32(0.0), False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.micro_batch_rows": 12}, "train.micro_batch_rows=12"),
        ({"train.micro_batch_rows": 4}, "multiple of rollout.group_size=8"),
        ({"train.micro_batch_rows": -2}, "train.micro_batch_rows=-2"),
        ({"train.micro_batch_rows": -1}, "train.activation_budget_gib"),
        ({"sft.micro_batch_rows": 5}, "sft.micro_batch_rows=5"),
    ],
)
def test_bad_micro_batch_config_names_the_key(overrides, message):
    from jaxtrace import config as config_lib
    from jaxtrace.errors import ConfigError

    c = config_lib.base()
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        c[section][key] = value
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(c)


@pytest.mark.slow
def test_train_cli_with_micro_batches(tmp_path):
    """`python -m jaxtrace.train` on configs/tiny.py with the documented override."""
    cmd = [
        sys.executable,
        "-m",
        "jaxtrace.train",
        "--config=configs/tiny.py",
        f"--config.workdir={tmp_path / 'run'}",
        "--config.train.micro_batch_rows=16",
        "--config.sft.micro_batch_rows=32",
        "--config.sft.steps=2",
        "--config.train.steps=2",
        "--config.train.log_every=1",
        "--config.train.progress=False",
        "--config.rollout.prompts_per_step=4",
        "--config.data.num_train=64",
        "--config.data.num_test=8",
        "--config.eval.batch_size=8",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    records = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"train/loss"' in records and '"sft/loss"' in records


def test_rows_for_budget():
    """The largest whole-group divisor of the rows that fits the per-device budget."""
    fit = microbatch.rows_for_budget
    assert fit(64, 8, 100, budget_bytes=1e9) == 64  # everything fits
    assert fit(64, 8, 100, budget_bytes=2500) == 16  # 16 rows = 1600 B fit, 32 (3200 B) do not
    assert fit(64, 8, 100, budget_bytes=2500, dp=4) == 64  # 16 rows per device
    assert fit(64, 8, 100, budget_bytes=10) == 8  # nothing fits: one group
    assert fit(48, 8, 100, budget_bytes=2000, dp=16) == 48  # multiple of lcm(8, 16) dividing 48
    assert fit(24, 1, 100, budget_bytes=1000) == 8  # divisors of 24 only (not 10)


def test_aot_compiles_micro_batched_step_on_a_mesh():
    """`jaxtrace.aot.programs` builds the micro-batched RL step the config names (here derived
    from a budget) and it compiles for 8 devices (rows split over the data axis)."""
    from jaxtrace import aot, sharding
    from jaxtrace.config import base, model_config

    c = base()
    c.algo.name = "grpo"
    c.model.num_layers = 1
    c.rollout.update(prompts_per_step=8, group_size=4, max_new_tokens=8)
    per_row = microbatch.activation_bytes_per_row(model_config(c), 40, 8)  # P + N
    c.train.micro_batch_rows = -1
    c.train.activation_budget_gib = 1.5 * per_row / 2**30  # 1 row per device fits, 2 do not
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:8])
    assert microbatch.resolve_rows(c, "train", dp=8) == 8
    progs = {p.name: p for p in aot.programs(aot.with_placeholders(c), mesh)}
    assert "micro-batches of 8 rows" in progs["rl_step"].what
    result = aot.compile_program(progs["rl_step"], mesh)
    assert result.status == "ok", result.message


def test_fp32_grad_sums_are_sharded_like_the_params():
    """Under FSDP the scan's float32 gradient sums stay sharded (a replicated copy of every
    gradient would cost the whole model in fp32 per device): in the compiled step the embedding
    [512, 128] (bf16, split 8 ways on its second axis) appears in fp32 only as its [512, 16]
    shard."""
    from jaxtrace import aot
    from jaxtrace.config import base

    c = base()
    c.algo.name = "grpo"
    c.model.update(num_layers=1, param_dtype="bfloat16", dtype="bfloat16")
    c.rollout.update(prompts_per_step=8, group_size=4, max_new_tokens=8)
    c.mesh.update(data=1, fsdp=-1)
    c.train.micro_batch_rows = 16
    mesh = sharding.make_mesh(dict(c.mesh), jax.devices()[:8])
    prog = {p.name: p for p in aot.programs(aot.with_placeholders(c), mesh)}["rl_step"]
    embed = prog.args[0]["params"]["embed_tokens"]
    assert embed.shape == (512, 128) and embed.dtype == jnp.bfloat16
    with sharding.mesh_context(mesh):
        hlo = prog.fn.lower(*prog.args).compile().as_text()
    # The micro-batch loop's carry (the sums): the fp32 embedding only as its shard. (The log-prob
    # op's backward makes a transient whole dW per device inside the loop body - W is gathered
    # for it as for any FSDP matmul - but never carries one across micro-batches.)
    loops = [ln for ln in hlo.splitlines() if re.search(r"= \(.*\) while\(", ln)]
    assert loops and any("f32[512,16]" in ln for ln in loops)
    assert not any("f32[512,128]" in ln or "f32[128,512]" in ln for ln in loops)
