"""End to end: the trainer on a miniature of the tiny config (in-process and via the CLI)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxtrace import trainer
from jaxtrace.config import ConfigError, base, model_dict, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mini_config(workdir, algo="trace", steps=3):
    c = base()
    c.workdir = str(workdir)
    c.model = model_dict(
        "tiny",
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
    )
    c.data.update(num_train=64, num_test=8, vocab_size=320)
    c.rollout.update(prompts_per_step=2, group_size=4, max_new_tokens=40)
    c.sft.update(steps=4, batch_size=8)
    # The soft overlong penalty makes rewards differ inside a group even when every answer is
    # wrong, so the advantages (and the params) really change in these short runs.
    c.algo.update(name=algo, kl_warmup_steps=1, kl_decay_steps=2, overlong_cache_len=20)
    c.train.update(steps=steps, log_every=1, ckpt_every=2, progress=False)
    c.eval.batch_size = 8
    c.mesh.update(data=-1)
    return c


@pytest.mark.slow
def test_trace_run_logs_diagnostics_and_resumes_exactly(tmp_path):
    straight = trainer.run(mini_config(tmp_path / "a", steps=4))
    assert straight["steps"] == 4 and "after" in straight and "before" in straight
    lines = [json.loads(s) for s in open(tmp_path / "a" / "metrics.jsonl")]
    train_rows = [r for r in lines if "train/accuracy" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for key in (
        "entropy",
        "response_length",
        "frac_grpo",
        "frac_fkl",
        "frac_rkl",
        "lambda",
        "cum_exposure",
        "clip_frac",
        "zero_variance_group_frac",
        "kl_fkl_mean",
    ):
        assert f"train/{key}" in train_rows[0], key
    assert train_rows[0]["train/lambda"] == 1.0 and train_rows[-1]["train/lambda"] == 0.0
    assert os.path.exists(tmp_path / "a" / "config.json")
    assert os.path.exists(tmp_path / "a" / "tokenizer.model")

    # Stop after 2 steps, then resume to 4: bitwise-equal params, optimizer state, metrics.
    trainer.run(mini_config(tmp_path / "b", steps=2))
    resumed = trainer.run(mini_config(tmp_path / "b", steps=4))
    assert resumed["before"] == straight["before"]
    for a, b in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows_b = [json.loads(s) for s in open(tmp_path / "b" / "metrics.jsonl")]
    last_a = [r for r in lines if r["step"] == 4 and "train/loss" in r][0]
    last_b = [r for r in rows_b if r["step"] == 4 and "train/loss" in r][0]
    last_a.pop("train/step_time_s")
    last_b.pop("train/step_time_s")
    assert last_a == last_b


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "opsd"])
def test_baselines_run(tmp_path, algo):
    out = trainer.run(mini_config(tmp_path, algo=algo, steps=2))
    assert out["steps"] == 2
    rows = [json.loads(s) for s in open(tmp_path / "metrics.jsonl")]
    row = [r for r in rows if "train/frac_fkl" in r][-1]
    if algo == "grpo":
        assert row["train/frac_fkl"] == 0.0 and row["train/cum_exposure"] == 0.0
    else:  # all-token self-distillation: every response token is KL-routed
        assert row["train/frac_fkl"] == 1.0


def _ppo_config(workdir, steps):
    """PPO mini-batches (2 x 2 epochs), the reference KL at DeepSeekMath's 0.04 and dynamic
    sampling, on TRACE (the teacher's hidden states computed once per rollout batch)."""
    c = mini_config(workdir, steps=steps)
    c.rollout.prompts_per_step = 4  # 2 groups per mini-batch: 8 rows, one per forced device
    c.algo.update(
        num_minibatches=2,
        ppo_epochs=2,
        ref_kl_coef=0.04,
        dynamic_sampling=True,
        max_sampling_tries=3,
    )
    return c


@pytest.mark.slow
def test_ppo_minibatches_ref_kl_and_dynamic_sampling_resume_exactly(tmp_path):
    straight = trainer.run(_ppo_config(tmp_path / "a", steps=2))
    assert straight["steps"] == 2  # state["step"] counts rollout batches, not updates
    rows = [json.loads(s) for s in open(tmp_path / "a" / "metrics.jsonl")]
    train_rows = [r for r in rows if "train/loss" in r]
    for r in train_rows:
        assert r["train/updates"] == 4 and r["train/skipped_updates"] == 0
        assert 1 <= r["train/sampling_tries"] <= 3
        for key in (
            "ref_kl",
            "approx_kl",
            "clip_frac_low",
            "clip_frac_high",
            "old_logp_vs_sampler",
        ):
            assert np.isfinite(r[f"train/{key}"]), key
    # The frozen reference is the warm start: at step 2 the policy has moved away from it.
    assert train_rows[-1]["train/ref_kl"] > 0

    # Resume happens at rollout-batch boundaries: stop after 1, resume to 2, same everything.
    trainer.run(_ppo_config(tmp_path / "b", steps=1))
    resumed = trainer.run(_ppo_config(tmp_path / "b", steps=2))
    for a, b in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows_b = [json.loads(s) for s in open(tmp_path / "b" / "metrics.jsonl")]
    last_a = [r for r in rows if r["step"] == 2 and "train/loss" in r][0]
    last_b = [r for r in rows_b if r["step"] == 2 and "train/loss" in r][0]
    last_a.pop("train/step_time_s")
    last_b.pop("train/step_time_s")
    assert last_a == last_b


def test_bad_algo_settings_fail_validation(tmp_path):
    for update, match in (
        ({"num_minibatches": 3}, "num_minibatches=3 must divide"),
        ({"ppo_epochs": 0}, "ppo_epochs"),
        ({"ref_kl_coef": -0.1}, "ref_kl_coef"),
        ({"ref_kl_estimator": "k2"}, "ref_kl_estimator"),
        ({"name": "opsd", "ref_kl_coef": 0.04}, "opsd has none"),
        ({"clip_ratio_c": 0.5}, "clip_ratio_c"),
        ({"max_sampling_tries": 0}, "max_sampling_tries"),
        ({"norm": "mean"}, "algo.norm='mean'"),
        ({"overlong_cache_len": 41}, "overlong_cache_len"),
    ):
        c = mini_config(tmp_path)
        c.algo.update(**update)
        with pytest.raises(ConfigError, match=match):
            validate(c)


def test_bad_configs_fail_before_compute(tmp_path):
    c = mini_config(tmp_path)
    c.rollout.group_size = 1
    with pytest.raises(ConfigError, match="group_size"):
        validate(c)
    c = mini_config(tmp_path)
    c.algo.name = "ppo"
    with pytest.raises(ConfigError, match="algo.name='ppo'"):
        validate(c)
    c = mini_config(tmp_path)
    c.rollout.engine = "paged"
    with pytest.raises(ConfigError, match="rollout.engine='paged'"):
        validate(c)
    c = mini_config(tmp_path)
    c.model.vocab_size = 100  # smaller than the trained tokenizer
    with pytest.raises(ValueError, match="tokenizer vocab"):
        trainer.run(c)
    c = mini_config(tmp_path)
    c.rollout.max_prompt_len = 8
    with pytest.raises(ValueError, match="more than its budget 8"):
        trainer.run(c)


def _cli(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "jaxtrace.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_unknown_key_names_it():
    out = _cli("--config=configs/tiny.py", "--config.algo.no_such_key=1")
    assert out.returncode == 2
    assert "unknown config key 'algo.no_such_key'" in out.stderr


def test_cli_bad_value_exits_2(tmp_path):
    out = _cli(
        "--config=configs/tiny.py", "--config.rollout.group_size=1", f"--config.workdir={tmp_path}"
    )
    assert out.returncode == 2
    assert "group_size" in out.stderr
