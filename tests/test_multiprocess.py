"""Two JAX processes on one machine (CPU, gloo collectives) train exactly like one process.

Two local processes join one cluster with `jax.distributed.initialize` (1 CPU device each, a
2-way data-parallel mesh) and run the tiny TRACE config; one process with 2 CPU devices runs the
same global batch. Each process builds the full host batch itself (data order and sampling are
functions of (seed, step)) and `shard_batch` places it on the global mesh. The test asserts
equal per-step metrics and bitwise-equal final state, and that the checkpoint written by the
two processes restores in this (single) process. See tests/multiprocess_worker.py.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrace import checkpoint, sharding, steps
from jaxtrace.config import model_config
from tests.test_train import mini_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")
STEPS = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, out_npz, num_processes, devices_per_process, tmp_path):
    port = _free_port()
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        PYTHONPATH=REPO,
    )
    procs, logs = [], []
    for i in range(num_processes):
        log = tmp_path / f"{os.path.basename(workdir)}_{i}.log"
        logs.append(log)
        args = [str(workdir), str(out_npz), str(num_processes), str(i), str(port), str(STEPS)]
        procs.append(
            subprocess.Popen(
                [sys.executable, WORKER, *args],
                cwd=REPO,
                env=env,
                stdout=open(log, "w"),
                stderr=subprocess.STDOUT,
            )
        )
    for p, log in zip(procs, logs):
        try:
            rc = p.wait(timeout=900)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"worker timed out:\n{open(log).read()[-3000:]}")
        assert rc == 0, open(log).read()[-3000:]


def _rows(workdir):
    rows = {}
    for line in open(workdir / "metrics.jsonl"):
        r = json.loads(line)
        r.pop("train/step_time_s", None)
        rows.setdefault(r["step"], {}).update(r)
    return rows


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_restores_in_one(tmp_path):
    two, one = tmp_path / "two_processes", tmp_path / "one_process"
    _launch(two, tmp_path / "two.npz", 2, 1, tmp_path)
    _launch(one, tmp_path / "one.npz", 1, 2, tmp_path)

    rows_two, rows_one = _rows(two), _rows(one)
    assert [s for s in rows_one if "train/loss" in rows_one[s]] == list(range(1, STEPS + 1))
    assert rows_two == rows_one  # loss, grad norm, rewards, ... of every step, bitwise
    # Not vacuous: some step really updated the params (a step whose groups all tie on reward,
    # e.g. all truncated, has zero advantages and a zero gradient).
    assert any(rows_one[s]["train/grad_norm"] > 0 for s in range(1, STEPS + 1))
    final_two, final_one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    keys = [f"arr_{i}" for i in range(len(final_one.files))]  # np.savez(*leaves) names
    assert len(keys) == len(final_two.files) > 10
    for k in keys:
        np.testing.assert_array_equal(final_two[k], final_one[k])

    # The checkpoint written by two processes restores in this one process (other devices).
    c = mini_config(two)
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    _, params = sharding.init_sharded(model_config(c), mesh, seed=1)
    o = c.optim
    opt = steps.make_optimizer(o.lr, o.warmup_steps, o.grad_clip, o.weight_decay, o.b1, o.b2)
    abstract = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}
    ckpt = checkpoint.Checkpointer(str(two / "ckpt"))
    assert ckpt.latest_step() == STEPS
    state, host = ckpt.restore(None, abstract)
    ckpt.close()
    assert host["skipped_steps"] == 0
    restored = [np.asarray(x) for x in jax.tree.leaves(state)]
    assert len(restored) == len(keys)
    for k, x in zip(keys, restored):
        np.testing.assert_array_equal(final_two[k], x)
