"""Reliability guarantees (issue #8), each checked so that the test fails when it breaks.

1. Exact resume after a normal stop, SIGTERM and SIGKILL: params, optimizer state, data order,
   rollouts (sampling RNG) and metrics bitwise equal to a straight run (CLI, tiny TRACE config).
2. Preemption: SIGTERM with an async save in flight -> that save completes, a save at the
   current step, exit 0; SIGKILL during a save -> the next start restores the last complete step
   (Orbax's atomic commit: a half-written step is never listed).
3. Non-finite loss or gradient: the update is skipped (params and optimizer state unchanged),
   counted, and K in a row stop the run with a clear error.
4. RL edge cases: empty and truncated responses, zero-variance groups, a verifier or annotator
   that fails, garbage and out-of-range spans.
5. Bad configuration or input: a one-line error naming the thing, before any model compute,
   exit code 2 from the CLI.

The subprocess tests drive `python -m jaxtrace.train` with a config file written into tmp_path;
test-only hooks live in that file (they wrap `rl.build_batch` and Orbax's commit), so the product
code has no test switches. Timing never decides a result: the hooks block at a chosen step or
save until the test has sent its signal.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrace import checkpoint, rl, sharding, steps, trainer
from jaxtrace.config import model_config
from jaxtrace.losses import trace as trace_lib
from tests.test_train import mini_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(workdir, steps=3, algo="trace"):
    """The miniature TRACE config of tests/test_train.py on every local device, with DAPO's
    overlong shaping so that rewards vary inside a group: with an untrained policy every
    answer is wrong, all advantages would be 0 and the updates (nearly) no-ops, which would make
    a bitwise-resume check vacuous."""
    c = mini_config(workdir, algo=algo, steps=steps)
    c.mesh.update(data=-1)
    c.algo.overlong_cache_len = 20
    return c


# ------------------------------------------------------------------ 3. non-finite steps
@pytest.fixture(scope="module")
def tiny_model():
    """(model config, graphdef, optimizer, params, GRPO step) for the step-level tests; each test
    copies the params (the step donates its state), so the step compiles once per module."""
    cfg = model_config(tiny_config("/unused"))
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    graphdef, params = sharding.init_sharded(cfg, mesh, seed=0)
    opt = steps.make_optimizer(1e-2, 0, 1.0, 0.0, 0.9, 0.99)
    step_fn = steps.make_rl_step(graphdef, opt, steps.LossConfig(mode="grpo"))
    return SimpleNamespace(cfg=cfg, graphdef=graphdef, opt=opt, params=params, step=step_fn)


def _fresh_state(m):
    params = jax.tree.map(jnp.copy, m.params)
    return {"params": params, "opt_state": m.opt.init(params), "step": jnp.int32(0)}


def _rl_batch(vocab, rows=4, p=5, n=6, seed=0, empty_rows=()):
    rng = np.random.default_rng(seed)
    valid = np.ones((rows, p), bool)
    valid[0, :2] = False  # left padding
    mask = np.ones((rows, n), bool)
    mask[1, 3:] = False  # a short response
    for r in empty_rows:
        mask[r] = False
    adv = rng.standard_normal(rows).astype(np.float32)
    return {
        "prompt": rng.integers(3, vocab, (rows, p)).astype(np.int32),
        "prompt_valid": valid,
        "response": rng.integers(3, vocab, (rows, n)).astype(np.int32),
        "response_mask": mask,
        "advantages": adv,
        "route": np.where(mask, trace_lib.ROUTE_GRPO, trace_lib.ROUTE_IGNORE).astype(np.int32),
    }


def _host(tree):
    return [np.array(x) for x in jax.tree.leaves(tree)]


def _nan_grad_loss(real_loss):
    """rl_loss with the same (finite) value but a NaN gradient: d/dx sqrt(|x - x0|) at x0."""

    def loss(graphdef, params, batch, lam, cfg, use_teacher):
        value, metrics = real_loss(graphdef, params, batch, lam, cfg, use_teacher)
        leaf = jax.tree.leaves(params)[0]
        poison = jnp.sum(jnp.sqrt(jnp.abs(leaf - jax.lax.stop_gradient(leaf))))
        return value + 0.0 * poison, metrics

    return loss


@pytest.mark.parametrize("fault", ["nan_advantage", "inf_advantage", "nan_gradient"])
def test_nonfinite_step_leaves_params_and_optimizer_state_unchanged(fault, monkeypatch, tiny_model):
    state, step_fn = _fresh_state(tiny_model), tiny_model.step
    if fault == "nan_gradient":
        monkeypatch.setattr(steps, "rl_loss", _nan_grad_loss(steps.rl_loss))
        step_fn = steps.make_rl_step(
            tiny_model.graphdef, tiny_model.opt, steps.LossConfig(mode="grpo")
        )
    batch = _rl_batch(tiny_model.cfg.vocab_size)
    bad = dict(batch)
    if fault != "nan_gradient":
        bad["advantages"] = batch["advantages"].copy()
        bad["advantages"][2] = np.nan if fault == "nan_advantage" else np.inf
    before = _host({"params": state["params"], "opt_state": state["opt_state"]})  # donated
    state, m = step_fn(state, bad, jnp.float32(0.0), False)
    assert not bool(m["finite"])
    if fault == "nan_gradient":
        assert np.isfinite(float(m["loss"]))  # the loss alone would not have caught it
    assert int(state["step"]) == 1  # the iteration counts, the update does not happen
    after = _host({"params": state["params"], "opt_state": state["opt_state"]})
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    # The same state then takes a finite step normally (so the check above can fail).
    step_fn = tiny_model.step
    params_before = _host(state["params"])
    for _ in range(2):  # the first update has lr 0 (warm-up starts at 0)
        state, m = step_fn(state, batch, jnp.float32(0.0), False)
        assert bool(m["finite"])
    assert int(state["step"]) == 3
    changed = [not np.array_equal(a, b) for a, b in zip(params_before, _host(state["params"]))]
    assert any(changed)


def test_empty_responses_give_a_finite_zero_loss(tiny_model):
    state = _fresh_state(tiny_model)
    batch = _rl_batch(tiny_model.cfg.vocab_size, empty_rows=(0, 1, 2, 3))
    before = _host(state["params"])
    state, m = tiny_model.step(state, batch, jnp.float32(0.0), False)
    assert bool(m["finite"]) and float(m["loss"]) == 0.0
    for a, b in zip(before, _host(state["params"])):
        np.testing.assert_array_equal(a, b)  # zero gradient: Adam's update is exactly 0


@pytest.mark.slow
def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, monkeypatch):
    """NaN advantages injected at chosen steps: skipped and counted, the counter resets on a
    finite step, and the K-th consecutive one raises NonFiniteError naming the step."""
    poisoned = {0, 1, 3, 4, 5}  # with K=3: steps 0-1 skipped, 2 resets, 3-5 -> error at 5
    calls = []
    real = rl.build_batch

    def build_batch(*args, **kw):
        batch, metrics, use_teacher = real(*args, **kw)
        if len(calls) in poisoned:
            batch["advantages"] = np.full_like(batch["advantages"], np.nan)
        calls.append(1)
        return batch, metrics, use_teacher

    monkeypatch.setattr(rl, "build_batch", build_batch)
    c = tiny_config(tmp_path, steps=8)
    c.sft.steps = 0
    c.train.max_consecutive_nonfinite = 3
    with pytest.raises(trainer.NonFiniteError, match=r"3 consecutive steps .*\(last at step 5\)"):
        trainer.run(c)
    rows = [json.loads(s) for s in open(tmp_path / "metrics.jsonl")]
    skipped = {r["step"]: r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r}
    assert skipped == {1: 1, 2: 2, 3: 2, 4: 3, 5: 4}
    # The checkpoint at step 2 (two skipped updates) holds the initial params and optimizer state.
    cfg = model_config(c)
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    _, init = sharding.init_sharded(cfg, mesh, seed=c.seed)
    o = c.optim
    opt = steps.make_optimizer(o.lr, o.warmup_steps, o.grad_clip, o.weight_decay, o.b1, o.b2)
    fresh = {"params": init, "opt_state": opt.init(init), "step": jnp.int32(0)}
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    saved, host = ckpt.restore(2, fresh)
    ckpt.close()
    assert int(saved["step"]) == 2 and host["skipped_steps"] == 2
    for a, b in zip(
        _host(fresh["params"]) + _host(fresh["opt_state"]),
        _host(saved["params"]) + _host(saved["opt_state"]),
    ):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ 4. RL edge cases
class CharTokenizer:
    """One token per character (ids 3..), so spans and offsets are easy to reason about."""

    vocab_size, pad_id, eos_id, bos_id = 200, 0, 1, None

    def encode(self, text):
        return [3 + (ord(ch) % 190) for ch in text]

    def decode(self, ids):
        return "".join(chr(int(i) - 3 + 32) for i in ids if int(i) >= 3)

    def offsets(self, ids):
        return [(k, k + 1) for k in range(len(ids))]


def _algo(**kw):
    a = tiny_config("/unused").algo.to_dict()
    a.update(overlong_cache_len=0)
    a.update(kw)
    return SimpleNamespace(**a)


def _rollout(lengths, n=8, p=4, stopped=None):
    rows = len(lengths)
    mask = np.arange(n)[None, :] < np.asarray(lengths)[:, None]
    response = np.where(mask, 40 + np.arange(n)[None, :], 0).astype(np.int32)
    return {
        "prompt": np.full((rows, p), 5, np.int32),
        "prompt_valid": np.ones((rows, p), bool),
        "response": response,
        "response_mask": mask,
        "stopped": np.ones(rows, bool) if stopped is None else np.asarray(stopped),
    }


def _build(rollout, rewards, annotator=None, algo=None, lam=1.0, group_size=2):
    tok = CharTokenizer()
    encoder = rl.PromptEncoder(tok, "plain", 40, 80)
    rows = len(rewards)
    examples = [
        SimpleNamespace(question=f"q{i // group_size}", reference="r", answer="1")
        for i in range(rows)
    ]
    return rl.build_batch(
        rollout,
        examples,
        np.asarray(rewards, np.float32),
        group_size=group_size,
        tokenizer=tok,
        encoder=encoder,
        algo=algo or _algo(annotator="file"),
        annotator=annotator,
        lam=lam,
    )


class StubAnnotator:
    """Returns `make(request)` per request, or raises / returns the wrong count."""

    def __init__(self, make=None, raises=None, count=None):
        self.make, self.raises, self.count = make, raises, count

    def annotate(self, requests):
        if self.raises:
            raise self.raises
        out = [self.make(r) for r in requests]
        return out if self.count is None else out[: self.count]


def _result(spans, status="ok"):
    return lambda r: SimpleNamespace(spans=tuple(spans), kind=r.kind, status=status)


def test_zero_variance_groups_have_zero_advantage_and_are_counted():
    # group 0 all correct, group 1 all wrong, group 2 mixed
    batch, m, _ = _build(
        _rollout([5] * 6), [1, 1, 0, 0, 1, 0], StubAnnotator(_result([])), group_size=2
    )
    np.testing.assert_array_equal(batch["advantages"][:4], 0.0)
    assert batch["advantages"][4] > 0 > batch["advantages"][5]
    assert m["zero_variance_group_frac"] == pytest.approx(4 / 6)


def test_empty_response_rows_are_ignored():
    batch, m, _ = _build(_rollout([0, 5, 0, 3]), [0, 1, 1, 0], StubAnnotator(_result([(0, 2)])))
    assert (batch["route"][[0, 2]] == trace_lib.ROUTE_IGNORE).all()
    assert (batch["route"][1, :5] == trace_lib.ROUTE_FKL).sum() == 2  # key span of a correct row
    assert np.isfinite(batch["advantages"]).all()
    assert m["response_length"] == 2.0


@pytest.mark.parametrize("overlong_filter", [False, True])
def test_truncated_responses_counted_and_optionally_masked(overlong_filter):
    rollout = _rollout([8, 3, 8, 2], stopped=[False, True, False, True])
    algo = _algo(annotator="none", overlong_filter=overlong_filter)
    batch, m, _ = _build(rollout, [1, 0, 0, 1], algo=algo, lam=0.0)
    assert m["truncated_frac"] == 0.5
    truncated_routes = batch["route"][[0, 2]]
    if overlong_filter:
        assert (truncated_routes == trace_lib.ROUTE_IGNORE).all()
    else:
        assert (truncated_routes == trace_lib.ROUTE_GRPO).all()
    assert (batch["route"][1, :3] == trace_lib.ROUTE_GRPO).all()


@pytest.mark.parametrize(
    "annotator, failed, timeouts",
    [
        (StubAnnotator(raises=TimeoutError("annotator timed out")), 4, 0),
        (StubAnnotator(raises=RuntimeError("boom")), 4, 0),
        (StubAnnotator(_result([(0, 3)]), count=2), 4, 0),  # wrong number of results
        (StubAnnotator(lambda r: "garbage"), 4, 0),  # not a result at all
        (StubAnnotator(_result([], status="timeout")), 0, 4),
        (StubAnnotator(_result([], status="failed")), 4, 0),
    ],
    ids=["raises-timeout", "raises", "wrong-count", "garbage", "status-timeout", "status-failed"],
)
def test_failing_annotator_gives_no_spans_and_is_counted(annotator, failed, timeouts):
    batch, m, _ = _build(_rollout([5, 5, 5, 5]), [1, 0, 1, 0], annotator)
    assert (batch["route"][:, :5] == trace_lib.ROUTE_GRPO).all()  # every token back to GRPO
    assert m["annotator_failed"] == failed and m["annotator_timeouts"] == timeouts


def test_garbage_and_out_of_range_spans_are_dropped_and_counted():
    spans = [(0, 2), (3, 999), (-1, 2), (4, 1), (1.5, 3), ("a", "b"), (None,)]
    batch, m, _ = _build(_rollout([5, 5]), [1, 0], StubAnnotator(_result(spans)))
    assert m["annotator_dropped_spans"] == 2 * 6
    assert (batch["route"][0, :2] == trace_lib.ROUTE_FKL).all()  # the one good span survives
    assert (batch["route"][0, 2:5] == trace_lib.ROUTE_GRPO).all()


class _RaisingVerifier:
    def score(self, texts, golds):
        raise RuntimeError("math-verify worker exited during startup")


def test_verifier_that_raises_scores_zero_and_is_counted():
    rewards, stats = rl.score_rewards(_RaisingVerifier(), ["1", "2"], ["1", "1"])
    np.testing.assert_array_equal(rewards, [0.0, 0.0])
    assert stats["error"] == 2


def test_verifier_timeout_scores_zero_and_is_counted(tmp_path, monkeypatch):
    """A check that overruns its limit (a hung math-verify worker) scores 0 and is counted."""
    from jaxtrace.rewards import verifier as verifier_lib

    hang = tmp_path / "hanging_worker.py"
    hang.write_text("import time\nprint('{\"ready\": true}', flush=True)\ntime.sleep(600)\n")
    monkeypatch.setattr(verifier_lib, "_WORKER_SCRIPT", str(hang))
    with verifier_lib.MathVerifier(timeout_s=0.5) as v:
        rewards, stats = rl.score_rewards(v, ["\\boxed{x^2}", "\\boxed{7}"], ["x^2", "7"])
    np.testing.assert_array_equal(rewards, [0.0, 1.0])  # the plain-number fast path still scores
    assert stats["timeout"] == 1


# ------------------------------------------------------------------ 2. atomic checkpoints
def _small(v):
    return {"w": jnp.full((3, 2), v, jnp.float32), "step": jnp.int32(int(v))}


def test_half_written_step_is_never_listed(tmp_path):
    d = str(tmp_path / "ckpt")
    ckpt = checkpoint.Checkpointer(d, keep=3, async_save=False)
    ckpt.save(1, _small(1.0), {"at": 1})
    ckpt.save(2, _small(2.0), {"at": 2})
    ckpt.close()
    # A save of step 3 killed before its commit leaves Orbax's temporary directory behind.
    shutil.copytree(tmp_path / "ckpt" / "2", tmp_path / "ckpt" / "3.orbax-checkpoint-tmp")
    ckpt = checkpoint.Checkpointer(d, keep=3)
    assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
    state, host = ckpt.restore(None, _small(0.0))
    assert host == {"at": 2} and float(state["w"][0, 0]) == 2.0
    ckpt.save(3, _small(3.0), {"at": 3}, force=True)  # the step can be written again
    ckpt.wait()
    assert ckpt.latest_step() == 3 and ckpt.restore(3, _small(0.0))[1] == {"at": 3}
    ckpt.close()


_KILLED_SAVE = """
import sys, time
sys.path.insert(0, {repo!r})
import jax.numpy as jnp
from jaxtrace import checkpoint
from tests import reliability_hooks
reliability_hooks.install({hook_dir!r}, hold_save=2, hang=True)
ckpt = checkpoint.Checkpointer({ckpt_dir!r}, keep=3)
ckpt.save(1, {{"w": jnp.full((64, 64), 1.0)}}, {{"at": 1}}, force=True)
ckpt.wait()
ckpt.save(2, {{"w": jnp.full((64, 64), 2.0)}}, {{"at": 2}}, force=True)  # async; commit hangs
time.sleep(600)
"""


def test_sigkill_during_async_save_restores_last_complete_step(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    script = tmp_path / "killed_save.py"
    script.write_text(
        _KILLED_SAVE.format(repo=REPO, hook_dir=str(tmp_path), ckpt_dir=str(ckpt_dir))
    )
    proc = subprocess.Popen([sys.executable, str(script)], env=_env(1), cwd=REPO)
    try:
        _wait_for(tmp_path / "in_save", proc, tmp_path / "missing.log")
    finally:
        proc.kill()
        proc.wait()
    assert (ckpt_dir / "2.orbax-checkpoint-tmp").exists()  # killed mid-save, for real
    ckpt = checkpoint.Checkpointer(str(ckpt_dir))
    assert ckpt.all_steps() == [1]
    state, host = ckpt.restore(None, {"w": jnp.zeros((64, 64))})
    ckpt.close()
    assert host == {"at": 1}
    np.testing.assert_array_equal(np.asarray(state["w"]), 1.0)


# ------------------------------------------------------------------ subprocess helpers
def _env(devices, cache_dir=None):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=REPO,
    )
    if cache_dir:  # compile once for all the runs of a test
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(cache_dir),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        )
    return env


def _tail(log_path, n=3000):
    try:
        return open(log_path).read()[-n:]
    except OSError:
        return ""


def _wait_for(path, proc, log_path, timeout=400):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {path}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {path}:\n{_tail(log_path)}")
        time.sleep(0.05)


_CONFIG_FILE = """
import sys
sys.path.insert(0, {repo!r})
from tests import reliability_hooks
from tests.test_reliability import tiny_config

reliability_hooks.install({hook_dir!r}, **{hooks!r})


def get_config(arg=None):
    c = tiny_config({workdir!r}, steps={steps})
    c.train.ckpt_every = 2
    return c
"""


def _write_config(tmp_path, name, workdir, steps, **hooks):
    hook_dir = tmp_path / f"hooks_{name}"
    hook_dir.mkdir(exist_ok=True)
    path = tmp_path / f"config_{name}.py"
    text = _CONFIG_FILE.format(
        repo=REPO, hook_dir=str(hook_dir), hooks=hooks, workdir=str(workdir), steps=steps
    )
    path.write_text(text)
    return path, hook_dir


def _start(config_path, log_path, env):
    log = open(log_path, "w")
    return subprocess.Popen(
        [sys.executable, "-m", "jaxtrace.train", f"--config={config_path}"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _finish(proc, log_path, timeout=600):
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"run did not finish:\n{_tail(log_path)}")
    return rc


def _records(hook_dir):
    path = hook_dir / "record.jsonl"
    return [json.loads(s) for s in open(path)] if path.exists() else []


def _train_rows(workdir):
    """The last logged training metrics of each step (a resumed run re-logs the steps it
    redoes), without the wall-clock timing."""
    rows = {}
    for line in open(workdir / "metrics.jsonl"):
        r = json.loads(line)
        if "train/loss" in r:
            r.pop("train/step_time_s")
            rows[r["step"]] = r
    return rows


def _restore_state(workdir, step):
    c = tiny_config(workdir)
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    _, params = sharding.init_sharded(model_config(c), mesh, seed=123)
    o = c.optim
    opt = steps.make_optimizer(o.lr, o.warmup_steps, o.grad_clip, o.weight_decay, o.b1, o.b2)
    ckpt = checkpoint.Checkpointer(str(workdir / "ckpt"))
    state, host = ckpt.restore(
        step, {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}
    )
    ckpt.close()
    return state, host


# ------------------------------------------------------------------ 1 + 2. exact resume
@pytest.mark.slow
def test_sigterm_and_sigkill_then_resume_is_bitwise_exact(tmp_path):
    """Straight N=8 steps vs. SIGTERM at step 3 (with the async save of step 2 in flight) ->
    exit 0 -> restart -> SIGKILL with the save of step 4 half committed -> restart to 8.
    Params, optimizer state, data order, rollouts and metrics must be bitwise equal."""
    n = 8
    env = _env(1, tmp_path / "jax_cache")
    straight, chain = tmp_path / "straight", tmp_path / "chain"

    cfg, hooks_s = _write_config(tmp_path, "straight", straight, n)
    assert _finish(_start(cfg, tmp_path / "straight.log", env), tmp_path / "straight.log") == 0
    ref_records = _records(hooks_s)
    assert len(ref_records) == n
    # The chain reuses the finished warm start and tokenizer (as after a preemption in RL).
    shutil.copytree(straight / "sft", chain / "sft")
    for name in ("tokenizer.model", "tokenizer.vocab"):
        shutil.copy(straight / name, chain / name)

    # Leg 1: SIGTERM during step 3 while the save of step 2 waits to commit.
    cfg, hooks1 = _write_config(tmp_path, "leg1", chain, n, block_call=3, hold_save=2)
    log = tmp_path / "leg1.log"
    proc = _start(cfg, log, env)
    _wait_for(hooks1 / "in_save", proc, log)
    _wait_for(hooks1 / "at_call", proc, log)
    proc.send_signal(signal.SIGTERM)
    (hooks1 / "release").touch()
    assert _finish(proc, log) == 0, _tail(log)
    results = json.load(open(chain / "results.json"))
    assert results["preempted"] and results["steps"] == 3
    ckpt = checkpoint.Checkpointer(str(chain / "ckpt"))
    assert ckpt.all_steps() == [2, 3]  # the in-flight save finished, then the preemption save
    ckpt.close()
    assert not [p for p in os.listdir(chain / "ckpt") if "tmp" in p]
    assert _records(hooks1) == ref_records[:3]

    # Leg 2: resumes at 3; SIGKILL while the commit of step 4 hangs and step 5 is done.
    cfg, hooks2 = _write_config(tmp_path, "leg2", chain, n, hold_save=4, hang=True)
    log = tmp_path / "leg2.log"
    proc = _start(cfg, log, env)
    _wait_for(hooks2 / "in_save", proc, log)
    deadline = time.monotonic() + 300
    while 5 not in _train_rows(chain) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert (chain / "ckpt" / "4.orbax-checkpoint-tmp").exists()
    ckpt = checkpoint.Checkpointer(str(chain / "ckpt"))
    assert ckpt.latest_step() == 3 and 4 not in ckpt.all_steps()
    ckpt.close()
    leg2 = _records(hooks2)
    assert len(leg2) >= 2 and leg2 == ref_records[3 : 3 + len(leg2)]

    # Leg 3: restores step 3 (the last complete one) and runs to the end.
    cfg, hooks3 = _write_config(tmp_path, "leg3", chain, n)
    log = tmp_path / "leg3.log"
    assert _finish(_start(cfg, log, env), log) == 0, _tail(log)
    assert _records(hooks3) == ref_records[3:]  # data order and sampled rollouts

    ref, got = _train_rows(straight), _train_rows(chain)
    assert sorted(ref) == list(range(1, n + 1)) and got == ref
    ref_results = json.load(open(straight / "results.json"))
    results = json.load(open(chain / "results.json"))
    for key in ("before", "after", "steps", "cum_exposure"):
        assert results[key] == ref_results[key], key
    (a, host_a), (b, host_b) = _restore_state(straight, n), _restore_state(chain, n)
    assert host_a == host_b
    leaves_a, leaves_b = _host(a), _host(b)
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)
    # Not vacuous: RL moved the params away from the warm start it began with.
    warm, _ = checkpoint.restore_params(str(straight / "sft"), a["params"])
    assert any(not np.array_equal(x, y) for x, y in zip(_host(warm), _host(a["params"])))


# ------------------------------------------------------------------ 5. config / input errors
@pytest.mark.slow
@pytest.mark.parametrize(
    "override, devices, expected",
    [
        ("--config.algo.no_such_key=1", 1, "unknown config key 'algo.no_such_key'"),
        ("--config.rollout.group_size=four", 1, "rollout.group_size=four: invalid literal"),
        ("--config.mesh.data=3", 2, "mesh {'data': 3"),
        ("--config.mesh.data=-1", 3, "not divisible by the data-parallel size 3"),
        ("--config.rollout.group_size=1", 1, "rollout.group_size=1"),
        ("--config.model.vocab_size=100", 1, "model.vocab_size=100"),
        ("--config.rollout.max_prompt_len=8", 1, "rollout.max_prompt_len"),
    ],
    ids=["unknown-key", "wrong-type", "mesh", "batch-vs-dp", "group-1", "vocab", "prompt-len"],
)
def test_cli_bad_config_is_one_line_exit_2_before_compute(tmp_path, override, devices, expected):
    workdir = tmp_path / "run"
    cfg, _ = _write_config(tmp_path, "bad", workdir, 2)
    out = subprocess.run(
        [sys.executable, "-m", "jaxtrace.train", f"--config={cfg}", override],
        cwd=REPO,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(errors) == 1 and expected in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    for made_by_compute in ("ckpt", "sft", "metrics.jsonl"):
        assert not (workdir / made_by_compute).exists(), made_by_compute


def test_data_order_is_a_pure_function_of_seed_and_step():
    n, per_step, seed = 10, 3, 7
    order = np.concatenate([trainer.prompt_indices(s, per_step, n, seed) for s in range(10)])
    for epoch in range(3):  # every example once per epoch, a fresh permutation each epoch
        assert sorted(order[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert not np.array_equal(order[:n], order[n : 2 * n])
    resumed = np.concatenate([trainer.prompt_indices(s, per_step, n, seed) for s in range(4, 10)])
    np.testing.assert_array_equal(resumed, order[4 * per_step :])
    other = np.concatenate([trainer.prompt_indices(s, per_step, n, seed + 1) for s in range(4)])
    assert not np.array_equal(other, order[: 4 * per_step])
