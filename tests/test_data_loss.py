"""Nothing lost (issue 18): keep_ckpts=0 refused, one run per workdir (lock with a stale rule),
a checkpoint that does not restore skipped for the newest one that does, never deleted, and
retention that only ever counts good steps."""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from jaxtrace import checkpoint, paths, workdir_lock
from jaxtrace.config import ConfigError, validate
from jaxtrace.errors import InputError, WorkdirLockedError
from jaxtrace.workdir_lock import LOCK_NAME, WorkdirLock
from tests.test_train import mini_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(v):
    return {"w": jnp.full((64, 64), v, jnp.float32), "step": jnp.int32(int(v))}


def _saved(tmp_path, steps=(1, 2), keep=3):
    d = str(tmp_path / "ckpt")
    ckpt = checkpoint.Checkpointer(d, keep=keep, async_save=False)
    for s in steps:
        ckpt.save(s, _state(float(s)), {"at": s})
    ckpt.close()
    return d


def _truncate_arrays(step_dir):
    files = [f for f in glob.glob(f"{step_dir}/state/**/d/*", recursive=True) if os.path.isfile(f)]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _corrupt_host_json(step_dir):
    (path,) = [p for p in glob.glob(f"{step_dir}/host/*") if not p.endswith("commit_success.txt")]
    with open(path, "w") as f:
        f.write('{"at": ')


# ------------------------------------------------------------------ keep_ckpts=0
def test_keep_ckpts_0_is_rejected(tmp_path):
    c = mini_config(tmp_path / "run")
    c.train.keep_ckpts = 0
    with pytest.raises(ConfigError, match=r"train.keep_ckpts=0 must be >= 1"):
        validate(c)
    with pytest.raises(ValueError, match="keep at least 1"):
        checkpoint.Checkpointer(str(tmp_path / "ckpt"), keep=0)
    assert not (tmp_path / "ckpt").exists()


# ------------------------------------------------------------------ workdir lock
def test_second_run_on_a_workdir_in_use_is_refused_naming_the_first(tmp_path):
    with WorkdirLock(str(tmp_path)):
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(WorkdirLockedError) as e:
            WorkdirLock(str(tmp_path)).acquire()
        msg = str(e.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg and LOCK_NAME in msg
    assert not (tmp_path / LOCK_NAME).exists()  # released
    with WorkdirLock(str(tmp_path)):  # and free again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_log_line(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 5}
    stale["heartbeat"] = time.time()
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING, logger="jaxtrace"):
        with WorkdirLock(str(tmp_path)) as lock:
            held = json.loads((tmp_path / LOCK_NAME).read_text())
            assert held["token"] == lock.info["token"]
    assert f"taking over the stale lock {tmp_path / LOCK_NAME} of pid {dead.pid}" in caplog.text
    assert "is not running on this host" in caplog.text


@pytest.mark.parametrize(
    "other, stale",
    [
        ({"pid": os.getpid(), "started": -1}, False),  # alive: this process
        ({"pid": os.getpid(), "started": 1.0}, True),  # pid reused: this process is younger
        ({"pid": 1, "host": "elsewhere", "heartbeat": -5}, False),  # fresh heartbeat
        ({"pid": 1, "host": "elsewhere", "heartbeat": -3600}, True),
        ({"pid": "x"}, True),  # unreadable
    ],
    ids=["alive", "pid-reused", "other-host-fresh", "other-host-old", "garbage"],
)
def test_stale_rule(tmp_path, other, stale):
    """Negative times are seconds before now."""
    now = time.time()
    other = {"host": socket.gethostname(), **other}
    other = {k: now + v if k in ("started", "heartbeat") and v < 0 else v for k, v in other.items()}
    lock = WorkdirLock(str(tmp_path), heartbeat_s=1, stale_after_s=60)
    assert (lock.stale_reason(other) is not None) == stale


def test_heartbeat_refreshes_the_lock(tmp_path):
    with WorkdirLock(str(tmp_path), heartbeat_s=0.05, stale_after_s=1.0):
        first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
        deadline = time.monotonic() + 10
        while json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] == first:
            assert time.monotonic() < deadline, "heartbeat never refreshed"
            time.sleep(0.02)


_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from jaxtrace.workdir_lock import WorkdirLock
with WorkdirLock({workdir!r}):
    print("held", flush=True)
    time.sleep(120)
"""


def test_cli_on_a_locked_workdir_exits_3_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(repo=REPO, workdir=str(workdir))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "jaxtrace.train",
                "--config=configs/tiny.py",
                f"--config.workdir={workdir}",
            ],
            cwd=REPO,
            env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 3, out.stderr[-2000:]
    assert f"in use by pid {holder.pid} on host {socket.gethostname()}" in out.stderr
    assert "Traceback" not in out.stderr
    assert sorted(os.listdir(workdir)) == [LOCK_NAME]  # nothing written: not even config.json


def test_resuming_a_workdir_of_another_run_is_refused_and_keeps_its_config(tmp_path):
    """The README once ran the RKL variant in the TRACE run's workdir: it 'resumed' TRACE's
    checkpoint and overwrote its config.json."""
    from jaxtrace import trainer

    theirs = mini_config(tmp_path / "run", algo="grpo")
    (tmp_path / "run" / "ckpt" / "3").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(theirs.to_json_best_effort())
    ours = mini_config(tmp_path / "run")
    ours.model.hidden_size = 48
    with pytest.raises(ConfigError, match=r"algo.name: 'grpo' there, 'trace' here") as e:
        trainer.run(ours)
    assert "model.hidden_size: 32 there, 48 here" in str(e.value)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["algo"]["name"] == "grpo"
    trainer.check_resume_matches(theirs)  # the same run may resume
    trainer.check_resume_matches(
        mini_config(tmp_path / "run", algo="grpo", steps=100)
    )  # steps may change


# ------------------------------------------------------------------ corrupt checkpoints
@pytest.mark.parametrize("corrupt", [_truncate_arrays, _corrupt_host_json], ids=["array", "host"])
def test_corrupt_latest_checkpoint_falls_back_to_the_newest_good_step(tmp_path, corrupt, caplog):
    d = _saved(tmp_path, steps=(1, 2, 3))
    corrupt(os.path.join(d, "3"))
    ckpt = checkpoint.Checkpointer(d, keep=3)
    with caplog.at_level(logging.WARNING, logger="jaxtrace"):
        state, host = ckpt.restore(None, _state(0.0))
    assert host == {"at": 2} and float(state["w"][0, 0]) == 2.0
    assert [s for s, _ in ckpt.skipped] == [3]
    assert f"checkpoint step 3 in {d} does not restore (" in caplog.text
    assert "restored checkpoint step 2" in caplog.text
    assert os.path.isdir(os.path.join(d, "3"))  # skipped, not deleted
    ckpt.close()


def test_restore_params_falls_back_too(tmp_path):
    d = str(tmp_path / "ckpt")
    ckpt = checkpoint.Checkpointer(d, keep=3, async_save=False)
    for s in (1, 2):
        ckpt.save(s, {"params": {"w": jnp.full((8, 8), float(s))}, "step": jnp.int32(s)}, {})
    ckpt.close()
    _truncate_arrays(os.path.join(d, "2"))
    params, step = checkpoint.restore_params(d, {"w": jnp.zeros((8, 8))})
    assert step == 1 and float(params["w"][0, 0]) == 1.0
    with pytest.raises(InputError, match=r"checkpoint step 2 in .* does not restore"):
        checkpoint.restore_params(d, {"w": jnp.zeros((8, 8))}, step=2)


def test_no_step_restores_is_an_input_error_naming_each(tmp_path):
    d = _saved(tmp_path, steps=(1, 2))
    _truncate_arrays(os.path.join(d, "1"))
    _corrupt_host_json(os.path.join(d, "2"))
    ckpt = checkpoint.Checkpointer(d, keep=3)
    with pytest.raises(InputError, match=r"no checkpoint step in .* restores \(step 2: .*step 1:"):
        ckpt.restore(None, _state(0.0))
    ckpt.close()
    assert sorted(os.listdir(d)) == ["1", "2"]


def test_retention_never_deletes_the_only_good_checkpoint(tmp_path):
    """keep=1 with steps [1 good, 2 corrupt]: the run resumes from 1 and moves 2 aside; step 1
    goes only once a new good step 2 is committed, and the corrupt one is kept for inspection."""
    d = _saved(tmp_path, steps=(1, 2), keep=2)
    _truncate_arrays(os.path.join(d, "2"))
    ckpt = checkpoint.Checkpointer(d, keep=1, async_save=False)
    _, host = ckpt.restore(None, _state(0.0))
    assert host == {"at": 1}
    moved = ckpt.quarantine([s for s, _ in ckpt.skipped])
    assert moved == [os.path.join(d, "2.corrupt-0")] and os.path.isdir(moved[0])
    assert ckpt.all_steps() == [1]  # the only good step, still there
    ckpt.save(2, _state(5.0), {"at": 22})  # the step number can be saved again
    assert ckpt.all_steps() == [2]
    state, host = ckpt.restore(None, _state(0.0))
    assert host == {"at": 22} and float(state["w"][0, 0]) == 5.0
    ckpt.close()


def test_restore_params_never_creates_a_missing_directory(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        checkpoint.restore_params(str(missing), {"w": jnp.zeros(2)})
    assert not missing.exists()


@pytest.mark.slow
def test_run_with_corrupt_latest_checkpoint_resumes_from_the_previous_step(tmp_path, caplog):
    from jaxtrace import trainer

    c = mini_config(tmp_path / "run", steps=2)
    c.train.ckpt_every = 1
    c.sft.steps = 0  # small and short: the test is about checkpoints
    c.rollout.max_new_tokens = 8
    c.algo.overlong_cache_len = 4
    c.data.num_test = 4
    trainer.run(c)
    ckpt_dir = tmp_path / "run" / "ckpt"
    assert sorted(os.listdir(ckpt_dir)) == ["1", "2"]
    _truncate_arrays(str(ckpt_dir / "2"))
    with caplog.at_level(logging.INFO, logger="jaxtrace"):
        out = trainer.run(c)
    assert out["steps"] == 2
    assert "checkpoint step 2" in caplog.text and "resumed from step 1" in caplog.text
    assert sorted(os.listdir(ckpt_dir)) == ["1", "2", "2.corrupt-0"]
    assert workdir_lock.LOCK_NAME not in os.listdir(tmp_path / "run")


def test_lock_on_a_remote_workdir():
    """gs:// has no atomic create: the lock is written, read back, kept if still ours (fsspec's
    in-memory filesystem stands in for GCS)."""
    pytest.importorskip("fsspec")
    workdir = f"memory://jaxtrace_lock_test_{os.getpid()}/run"
    with WorkdirLock(workdir) as lock:
        assert paths.exists(lock.path)
        with pytest.raises(WorkdirLockedError, match=f"in use by pid {os.getpid()}"):
            WorkdirLock(workdir).acquire()
    assert not paths.exists(lock.path)


def test_host_state_missing_a_key_falls_back_to_the_previous_step(tmp_path):
    # A host JSON that parses but lacks what the trainer reads (edited by hand, or cut short at
    # a line break) is a step that does not restore, not a KeyError later.
    d = _saved(tmp_path, steps=(1, 2))
    (path,) = [p for p in glob.glob(f"{d}/2/host/*") if not p.endswith("commit_success.txt")]
    with open(path, "w") as f:
        json.dump({"other": 1}, f)
    ckpt = checkpoint.Checkpointer(d, keep=3)
    state, host = ckpt.restore(None, _state(0.0), host_keys=("at",))
    assert host == {"at": 1} and float(state["w"][0, 0]) == 1.0
    assert [s for s, _ in ckpt.skipped] == [2] and "lacks the keys ['at']" in ckpt.skipped[0][1]
    ckpt.close()
