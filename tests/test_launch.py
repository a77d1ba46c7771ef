"""launch/tpu_vm.sh: the exact gcloud commands under --dry-run (single host and multi-host pods),
the remote launch line run for real with a fake trainer, and the babysit loop against a fake
`gcloud` on PATH. Needs bash only: no gcloud, no network."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu_vm.sh"
NAME, ZONE, PROJECT = "trace-pod", "us-east5-a", "my-proj"
G = [f"--zone={ZONE}", f"--project={PROJECT}"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", NAME, *G]
# (accelerator type, default runtime version, hosts)
TYPES = [
    ("v5p-8", "v2-alpha-tpuv5", 1),
    ("v6e-8", "v2-alpha-tpuv6e", 1),
    ("v5p-64", "v2-alpha-tpuv5", 8),
    ("v6e-256", "v2-alpha-tpuv6e", 64),
]
TRICKY_ARGS = [
    "--config=configs/qwen3_1p7b_trace.py",
    "--config.workdir=gs://my-bucket/runs/q 1",
    '--config.note=it\'s $HOME "quoted" \\back; $(touch pwned) `x` *',
    "--config.empty=",
]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture
def env_file(tmp_path):
    path = tmp_path / "env"
    path.write_text(f"TPU_ZONE={ZONE}\nTPU_PROJECT={PROJECT}\nTPU_NAME={NAME}\n")
    return path


def _env(tmp_path: Path, bin_dir: Path | None = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "FAKE_"))}
    env["TMPDIR"] = str(tmp_path)
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def _script(*args, env_file, tmp_path, bin_dir=None, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), "--env", str(env_file), *args],
        capture_output=True,
        text=True,
        env=_env(tmp_path, bin_dir, **extra),
        timeout=60,
        cwd=tmp_path,
    )


def dry(tmp_path, env_file, *args) -> list[list[str]]:
    """Runs the script with --dry-run; returns each printed command as its argv."""
    poison = tmp_path / "poison"
    poison.mkdir(exist_ok=True)
    marker = tmp_path / "gcloud-was-called"
    (poison / "gcloud").write_text(f"#!/bin/sh\ntouch {marker}\nexit 99\n")
    (poison / "gcloud").chmod(0o755)
    r = _script("--dry-run", *args, env_file=env_file, tmp_path=tmp_path, bin_dir=poison)
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), "--dry-run called gcloud"
    lines = r.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), r.stdout
    return [shlex.split(line[2:]) for line in lines]


def remote(argv: list[str]) -> str:
    """The --command=... script of a gcloud ssh argv."""
    (cmd,) = [a for a in argv if a.startswith("--command=")]
    return cmd[len("--command=") :]


# ------------------------------------------------------------------------------------ create
@pytest.mark.parametrize("acc,version,hosts", TYPES)
def test_create_on_demand(tmp_path, env_file, acc, version, hosts):
    r = _script(
        "--dry-run", "create", f"--accelerator-type={acc}", env_file=env_file, tmp_path=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"+ gcloud compute tpus tpu-vm create {NAME} --zone={ZONE} --project={PROJECT} "
        f"--accelerator-type={acc} --version={version}"
    ]
    assert f"({hosts} host(s))" in r.stderr


@pytest.mark.parametrize("acc,version,hosts", TYPES)
def test_create_spot(tmp_path, env_file, acc, version, hosts):
    cmds = dry(tmp_path, env_file, "create", "--accelerator-type", acc, "--spot")
    assert cmds == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            NAME,
            *G,
            f"--accelerator-type={acc}",
            f"--version={version}",
            "--spot",
        ]
    ]


@pytest.mark.parametrize("spot", [False, True])
@pytest.mark.parametrize("acc,version,hosts", TYPES)
def test_create_queued_waits_for_the_resource(tmp_path, env_file, acc, version, hosts, spot):
    cmds = dry(
        tmp_path,
        env_file,
        "create",
        f"--accelerator-type={acc}",
        "--queued",
        *(["--spot"] if spot else []),
    )
    assert cmds == [
        [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "create",
            f"{NAME}-qr",
            *G,
            f"--accelerator-type={acc}",
            f"--runtime-version={version}",
            f"--node-id={NAME}",
            *(["--spot"] if spot else []),
        ],
        [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "describe",
            f"{NAME}-qr",
            *G,
            "--format=value(state.state)",
        ],
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", NAME, *G, "--format=value(state)"],
    ]


def test_flags_win_over_the_env_file(tmp_path):
    env = tmp_path / "env2"
    env.write_text(
        "TPU_ZONE=europe-west4-a\nTPU_ACCELERATOR_TYPE=v6e-8\nTPU_SPOT=1\n"
        "TPU_EXTRA_CREATE_FLAGS='--network=net1 --reserved'\n"
    )
    (from_file,) = dry(tmp_path, env, "create")
    assert from_file == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "jaxtrace-tpu",
        "--zone=europe-west4-a",
        "--accelerator-type=v6e-8",
        "--version=v2-alpha-tpuv6e",
        "--spot",
        "--network=net1",
        "--reserved",
    ]
    (flags,) = dry(
        tmp_path,
        env,
        "create",
        "--zone=us-central2-b",
        "--accelerator-type=v5p-64",
        "--on-demand",
        "--version",
        "v2-custom",
        "--name",
        "other",
        "--project",
        "p2",
    )
    assert flags == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "other",
        "--zone=us-central2-b",
        "--project=p2",
        "--accelerator-type=v5p-64",
        "--version=v2-custom",
        "--network=net1",
        "--reserved",
    ]


# ------------------------------------------------------------------------------ setup, run
def _check_copy(cmds, tmp_path):
    tarball = f"{tmp_path}/jaxtrace-code-{NAME}.tar.gz"
    pack = " ".join(cmds[0])
    assert pack.startswith(f"git -C {ROOT} ls-files -z --cached --others --exclude-standard")
    assert pack.endswith(f"tar -C {ROOT} -czf {tarball} --null -T -")
    assert cmds[1] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        tarball,
        f"{NAME}:jaxtrace-code.tar.gz",
        *G,
        "--worker=all",
    ]
    assert cmds[2] == [
        *SSH,
        "--worker=all",
        '--command=rm -rf "$HOME/jaxtrace" && mkdir -p "$HOME/jaxtrace" && '
        'tar -xzf "$HOME/jaxtrace-code.tar.gz" -C "$HOME/jaxtrace"',
    ]


def test_setup_copies_code_and_installs_on_all_workers(tmp_path, env_file):
    cmds = dry(tmp_path, env_file, "setup")
    assert len(cmds) == 4
    _check_copy(cmds, tmp_path)
    assert cmds[3][:-1] == [*SSH, "--worker=all"]
    assert remote(cmds[3]) == (
        'set -euo pipefail; cd "$HOME/jaxtrace"; export PATH="$HOME/.local/bin:$PATH"; '
        "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; "
        '[ -x "$HOME/jaxtrace_venv"/bin/python ] || uv venv --python 3.12 "$HOME/jaxtrace_venv"; '
        """uv pip install --python "$HOME/jaxtrace_venv"/bin/python '.[tpu,data]' """
        "tokenizers huggingface_hub; "
        """"$HOME/jaxtrace_venv"/bin/python -c 'import jaxtrace'"""
    )


def test_setup_with_pip_and_a_setup_hook(tmp_path):
    env = tmp_path / "env3"
    env.write_text(
        f"TPU_ZONE={ZONE}\nTPU_INSTALLER=pip\nTPU_PYTHON=3.11\nTPU_PIP_EXTRAS=tpu\n"
        "TPU_EXTRA_PIP=\nTPU_VENV=/opt/venv\n"
        "TPU_SETUP_EXTRA='mkdir -p ~/data'\n"
    )
    script = remote(dry(tmp_path, env, "setup")[-1])
    assert script == (
        'set -euo pipefail; cd "$HOME/jaxtrace"; [ -x "/opt/venv"/bin/python ] || '
        'python3.11 -m venv "/opt/venv"; "/opt/venv"/bin/pip install -U pip; '
        """"/opt/venv"/bin/pip install '.[tpu]'; "/opt/venv"/bin/python -c 'import jaxtrace'; """
        "mkdir -p ~/data"
    )


KILL = (
    "pkill -f '^[^ ]*python[^ ]* -m jaxtrace[.]train' || true; sleep 3; "
    "sudo fuser -k /dev/accel* /dev/vfio/* 2>/dev/null || true; "
    "sudo rm -f /tmp/libtpu_lockfile"
)


@pytest.mark.parametrize("acc,version,hosts", TYPES)
def test_run_kills_stale_holders_then_starts_on_all_workers(
    tmp_path, env_file, acc, version, hosts
):
    r = _script(
        "--dry-run",
        "run",
        f"--accelerator-type={acc}",
        "--",
        *TRICKY_ARGS,
        env_file=env_file,
        tmp_path=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    cmds = [shlex.split(line[2:]) for line in r.stdout.splitlines()]
    assert len(cmds) == 5
    _check_copy(cmds, tmp_path)
    assert cmds[3] == [*SSH, "--worker=all", f"--command={KILL}"]
    assert cmds[4][:-1] == [*SSH, "--worker=all"]
    launch = remote(cmds[4])
    assert "setsid nohup bash -c " in launch and launch.endswith("< /dev/null &")
    assert '>> "$HOME/jaxtrace_logs"/worker-$W.log 2>&1' in launch
    assert "agent-worker-number" in launch
    assert f"all {hosts} worker(s) of {acc}" in r.stderr
    assert "warning" not in r.stderr
    # The trainer's argv, parsed back out of the two levels of quoting; a pod also gets
    # --distributed so jax.distributed always starts there.
    inner = shlex.split(launch.split("bash -c ", 1)[1])[0]
    trainer = shlex.split(inner.split(" -m jaxtrace.train ", 1)[1].split("; echo $?")[0])
    assert trainer == (["--distributed"] if hosts > 1 else []) + TRICKY_ARGS
    # Every ssh / scp targets all workers.
    assert all("--worker=all" in c for c in cmds[1:])


@pytest.mark.parametrize("acc,version,hosts", TYPES)
def test_run_on_a_pod_warns_without_a_gcs_workdir(tmp_path, env_file, acc, version, hosts):
    args = ["--dry-run", "run", f"--accelerator-type={acc}", "--", "--config=c.py"]
    r = _script(*args, env_file=env_file, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert ("same checkpoint directory" in r.stderr) == (hosts > 1)


def test_trainer_pattern_matches_only_the_trainer():
    pattern = re.compile("^[^ ]*python[^ ]* -m jaxtrace[.]train")
    assert pattern.search("/home/u/jaxtrace_venv/bin/python -m jaxtrace.train --config=x.py")
    assert pattern.search("python3.12 -m jaxtrace.train --config=x.py")
    for other in (
        "bash -c cd x && python -m jaxtrace.train --config=x.py",
        "pkill -f ^[^ ]*python[^ ]* -m jaxtrace[.]train",
        "/usr/bin/python -m jaxtrace.export --ckpt=x",
    ):
        assert not pattern.search(other), other


def test_the_launch_line_runs_the_trainer_with_its_args_intact(tmp_path, env_file):
    """Runs the printed remote command in a local bash, with a fake trainer python and a fake
    metadata server saying this is worker 3: the args arrive byte for byte, nothing expands."""
    cmds = dry(tmp_path, env_file, "run", "--", *TRICKY_ARGS)
    home, fake_bin = tmp_path / "home", tmp_path / "fakebin"
    (home / "jaxtrace").mkdir(parents=True)
    (home / "jaxtrace_venv" / "bin").mkdir(parents=True)
    fake_bin.mkdir()
    python = home / "jaxtrace_venv" / "bin" / "python"
    python.write_text(
        '#!/bin/sh\nprintf "%s\\0" "$PWD" "$@" > "$HOME/argv"\necho "trainer says hi"\nexit 7\n'
    )
    python.chmod(0o755)
    (fake_bin / "curl").write_text("#!/bin/sh\necho 3\n")
    (fake_bin / "curl").chmod(0o755)
    env = _env(tmp_path, fake_bin, HOME=str(home))
    subprocess.run(["bash", "-c", remote(cmds[-1])], env=env, check=True, timeout=30, cwd=tmp_path)
    exit_file = home / "jaxtrace_logs" / "worker-3.exit"
    deadline = time.monotonic() + 20
    while not exit_file.exists() or not exit_file.read_text().strip():
        assert time.monotonic() < deadline, "the trainer never finished"
        time.sleep(0.05)
    argv = (home / "argv").read_bytes().decode().split("\0")[:-1]
    assert argv == [str(home / "jaxtrace"), "-m", "jaxtrace.train", *TRICKY_ARGS]
    assert exit_file.read_text().strip() == "7"
    log = (home / "jaxtrace_logs" / "worker-3.log").read_text()
    assert "start jaxtrace.train ===" in log and "trainer says hi" in log
    assert not (home / "jaxtrace" / "pwned").exists() and not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------- logs, ssh, status, delete
@pytest.mark.parametrize(
    "args,worker,script",
    [
        ([], "0", 'tail -n 100 "$HOME/jaxtrace_logs"/worker-0.log'),
        (
            ["--worker=2", "--lines=5", "--follow"],
            "2",
            'tail -n 5 -F "$HOME/jaxtrace_logs"/worker-2.log',
        ),
        (
            ["--worker", "all", "-f"],
            "all",
            "W=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/"
            "instance/attributes/agent-worker-number || echo 0); "
            'tail -n 100 -F "$HOME/jaxtrace_logs"/worker-$W.log | sed -u "s/^/[worker $W] /"',
        ),
    ],
)
def test_logs(tmp_path, env_file, args, worker, script):
    assert dry(tmp_path, env_file, "logs", *args) == [
        [*SSH, f"--worker={worker}", f"--command={script}"]
    ]


def test_ssh(tmp_path, env_file):
    assert dry(tmp_path, env_file, "ssh", "--worker=1") == [[*SSH, "--worker=1"]]
    assert dry(tmp_path, env_file, "ssh", "--worker=all", "--", "pgrep", "-af", "python") == [
        [*SSH, "--worker=all", "--command=pgrep -af python"]
    ]


def test_status(tmp_path, env_file):
    cmds = dry(tmp_path, env_file, "status", "--queued")
    assert cmds[0] == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "describe",
        f"{NAME}-qr",
        *G,
        "--format=value(state.state)",
    ]
    assert cmds[1] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "describe",
        NAME,
        *G,
        "--format=value(state)",
    ]
    assert cmds[2][:-1] == [*SSH, "--worker=0"] and "pgrep" in remote(cmds[2])


@pytest.mark.parametrize("acc", ["v5p-8", "v6e-256"])
def test_delete(tmp_path, env_file, acc):
    assert dry(tmp_path, env_file, "delete", f"--accelerator-type={acc}") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", NAME, *G, "--quiet"]
    ]
    assert dry(tmp_path, env_file, "delete", "--queued") == [
        [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "delete",
            f"{NAME}-qr",
            *G,
            "--force",
            "--quiet",
        ]
    ]


def test_help(tmp_path, env_file):
    r = _script("--help", env_file=env_file, tmp_path=tmp_path)
    assert r.returncode == 0
    for word in (
        "Usage:",
        "create",
        "setup",
        "run",
        "logs",
        "ssh",
        "status",
        "delete",
        "babysit",
        "--dry-run",
        "--spot",
        "--queued",
    ):
        assert word in r.stdout, word


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "args,message",
    [
        ([], "missing command"),
        (["frobnicate"], "unknown command: frobnicate"),
        (["create"], "missing accelerator type"),
        (["babysit", "--", "--config=configs/tiny.py"], "missing accelerator type"),
        (["create", "--accelerator-type=tpu9000"], "bad accelerator type 'tpu9000'"),
        (["create", "--accelerator-type=v9z-8"], "no default runtime version"),
        (["create", "--bogus"], "unknown option: --bogus"),
        (["create", "--bogus=1"], "unknown option: --bogus"),
        (["create", "--zone"], "option --zone needs a value"),
        (["logs", "--worker=x"], "--worker must be a worker number or 'all'"),
        (["logs", "--lines=-3"], "--lines must be a non-negative integer"),
        (["run"], "run needs trainer arguments after --"),
        (["run", "--", "--config.seed=1"], "must include --config="),
        (
            ["babysit", "--accelerator-type=v5p-8", "--max-retries=x", "--", "--config=c.py"],
            "--max-retries must be a non-negative integer",
        ),
        (["delete", "--", "x"], "delete takes no arguments after --"),
        (["ssh", "--worker=all"], "an interactive ssh needs one worker"),
        (["create", "extra"], "unexpected argument 'extra'"),
        (["create", "--name=Bad_Name", "--accelerator-type=v5p-8"], "TPU name must be lowercase"),
    ],
)
def test_bad_input_fails_naming_the_problem(tmp_path, env_file, args, message):
    r = _script("--dry-run", *args, env_file=env_file, tmp_path=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert not r.stdout


def test_missing_zone_and_env_file(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("")
    r = _script("--dry-run", "delete", env_file=empty, tmp_path=tmp_path)
    assert r.returncode == 2 and "missing zone" in r.stderr
    r = _script("delete", env_file=tmp_path / "nope", tmp_path=tmp_path)
    assert r.returncode == 2 and "env file not found" in r.stderr


def test_venv_inside_the_code_dir_is_refused(tmp_path):
    env = tmp_path / "env4"
    env.write_text(f"TPU_ZONE={ZONE}\nTPU_VENV=jaxtrace/.venv\n")
    r = _script("--dry-run", "setup", env_file=env, tmp_path=tmp_path)
    assert r.returncode == 2 and "TPU_REMOTE_DIR" in r.stderr


# --------------------------------------------------------------------------------- babysit
FAKE_GCLOUD = """#!{python}
import json, os, sys
from pathlib import Path

d = Path(os.environ["FAKE_DIR"])
argv = sys.argv[1:]
with open(d / "calls.jsonl", "a") as f:
    f.write(json.dumps(argv) + "\\n")


def pop(name):  # the next answer; the last one repeats
    path = d / name
    items = path.read_text().split(",")
    path.write_text(",".join(items[1:] or items))
    return items[0]


if argv[:2] == ["compute", "tpus"] and argv[3] == "describe":
    state = pop("qr_states" if argv[2] == "queued-resources" else "node_states")
    if state == "NOT_FOUND":
        sys.exit(print("ERROR: (gcloud) NOT_FOUND: Resource 'x' was not found", file=sys.stderr)
                 or 1)
    if state == "ERROR":
        sys.exit(print("ERROR: (gcloud) connection reset", file=sys.stderr) or 1)
    print(state)
elif argv[3] == "ssh" and any("echo RUNNING" in a for a in argv):
    print(pop("jobs"))
"""


def babysit(tmp_path, env_file, *args, node="READY", qr="ACTIVE", jobs="EXIT 0"):
    """Runs babysit against a fake gcloud; returns (result, the gcloud argvs it saw)."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (fake / "gcloud").chmod(0o755)
    (fake / "node_states").write_text(node)
    (fake / "qr_states").write_text(qr)
    (fake / "jobs").write_text(jobs)
    code = tmp_path / "code"
    (code / "jaxtrace").mkdir(parents=True)
    (code / "jaxtrace" / "__init__.py").write_text("")
    r = _script(
        "babysit",
        "--accelerator-type=v5p-64",
        "--interval=0",
        f"--code-dir={code}",
        *args,
        env_file=env_file,
        tmp_path=tmp_path,
        bin_dir=fake,
        FAKE_DIR=str(fake),
    )
    calls_file = fake / "calls.jsonl"
    calls = (
        [json.loads(line) for line in calls_file.read_text().splitlines()]
        if calls_file.exists()
        else []
    )
    return r, calls


def kinds(calls) -> list[str]:
    """Names each gcloud call: 'describe', 'create', 'ssh:launch', ..."""
    out = []
    for c in calls:
        if c[3] == "ssh":
            script = remote(["gcloud", *c])
            kind = (
                "status"
                if "echo RUNNING" in script
                else "launch"
                if "setsid" in script
                else "kill"
                if "pkill" in script
                else "setup"
                if "pip install" in script
                else "extract"
                if "tar -xzf" in script
                else "other"
            )
            out.append(f"ssh:{kind}")
        else:
            out.append(("qr-" if c[2] == "queued-resources" else "") + c[3])
    return out


TRAIN = ["--config=configs/qwen3_8b_trace.py", "--config.workdir=gs://b/runs/x y"]
RECOVER = [
    "delete",
    "create",
    "describe",
    "scp",
    "ssh:extract",
    "ssh:setup",
    "ssh:kill",
    "ssh:launch",
]


def test_babysit_recreates_and_reruns_after_a_preemption(tmp_path, env_file):
    r, calls = babysit(
        tmp_path, env_file, "--max-retries=1", "--", *TRAIN, node="PREEMPTED,READY", jobs="EXIT 0"
    )
    assert r.returncode == 0, r.stderr
    assert kinds(calls) == ["describe", *RECOVER, "describe", "ssh:status"]
    assert calls[1] == ["compute", "tpus", "tpu-vm", "delete", NAME, *G, "--quiet"]
    assert calls[2] == [
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        NAME,
        *G,
        "--accelerator-type=v5p-64",
        "--version=v2-alpha-tpuv5",
    ]
    launch = remote(["gcloud", *calls[8]])
    assert "--worker=all" in calls[8]
    assert (
        f"-m jaxtrace.train --distributed {shlex.join(TRAIN)};"
        in shlex.split(launch.split("bash -c ")[1])[0]
    )
    assert "retry 1 of 1" in r.stderr and "finished" in r.stderr


def test_babysit_gives_up_after_max_retries(tmp_path, env_file):
    r, calls = babysit(tmp_path, env_file, "--max-retries=1", "--", *TRAIN, node="PREEMPTED")
    assert r.returncode == 1
    assert "giving up" in r.stderr
    assert kinds(calls) == ["describe", "delete", "create", "describe", "describe"]


def test_babysit_queued_spot_recreates_the_queued_resource(tmp_path, env_file):
    r, calls = babysit(
        tmp_path,
        env_file,
        "--queued",
        "--spot",
        "--max-retries=1",
        "--",
        *TRAIN,
        qr="SUSPENDED,ACTIVE",
        node="READY",
    )
    assert r.returncode == 0, r.stderr
    assert kinds(calls) == [
        "qr-describe",
        "qr-delete",
        "qr-create",
        "qr-describe",
        "describe",
        *RECOVER[3:],
        "qr-describe",
        "describe",
        "ssh:status",
    ]
    assert calls[1] == [
        "compute",
        "tpus",
        "queued-resources",
        "delete",
        f"{NAME}-qr",
        *G,
        "--force",
        "--quiet",
    ]
    assert calls[2] == [
        "compute",
        "tpus",
        "queued-resources",
        "create",
        f"{NAME}-qr",
        *G,
        "--accelerator-type=v5p-64",
        "--runtime-version=v2-alpha-tpuv5",
        f"--node-id={NAME}",
        "--spot",
    ]


def test_babysit_relaunches_a_dead_trainer_without_recreating(tmp_path, env_file):
    r, calls = babysit(tmp_path, env_file, "--max-retries=1", "--", *TRAIN, jobs="EXIT 1,EXIT 0")
    assert r.returncode == 0, r.stderr
    assert kinds(calls) == [
        "describe",
        "ssh:status",
        "scp",
        "ssh:extract",
        "ssh:kill",
        "ssh:launch",
        "describe",
        "ssh:status",
    ]


def test_babysit_stops_on_a_bad_configuration(tmp_path, env_file):
    r, calls = babysit(tmp_path, env_file, "--", *TRAIN, jobs="EXIT 2")
    assert r.returncode == 1 and "bad configuration" in r.stderr
    assert kinds(calls) == ["describe", "ssh:status"]


def test_babysit_brings_up_a_missing_tpu_without_spending_a_retry(tmp_path, env_file):
    r, calls = babysit(
        tmp_path,
        env_file,
        "--max-retries=0",
        "--",
        *TRAIN,
        node="NOT_FOUND,READY",
        jobs="RUNNING,EXIT 0",
    )
    assert r.returncode == 0, r.stderr
    assert kinds(calls) == [
        "describe",
        *RECOVER[1:],
        "describe",
        "ssh:status",
        "describe",
        "ssh:status",
    ]


def test_babysit_does_not_recreate_on_a_failed_query(tmp_path, env_file):
    r, calls = babysit(
        tmp_path, env_file, "--max-retries=0", "--", *TRAIN, node="ERROR,CREATING,READY"
    )
    assert r.returncode == 0, r.stderr
    assert kinds(calls) == ["describe", "describe", "describe", "ssh:status"]


def test_babysit_dry_run_shows_one_recovery_and_warns_without_gcs(tmp_path, env_file):
    r = _script(
        "--dry-run",
        "babysit",
        "--accelerator-type=v6e-256",
        "--",
        "--config=c.py",
        env_file=env_file,
        tmp_path=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    cmds = [shlex.split(line[2:]) for line in r.stdout.splitlines()]
    assert [c[4] if c[0] == "gcloud" else c[0] for c in cmds] == [
        "describe",
        "delete",
        "create",
        "describe",
        "git",
        "scp",
        "ssh",
        "ssh",
        "ssh",
        "ssh",
    ]
    assert "no --config.workdir=gs://" in r.stderr and "empty disk" in r.stderr


# ------------------------------------------------------------------------------ docs
def test_env_example_documents_every_variable_and_sources_cleanly(tmp_path):
    example = (ROOT / "launch" / "env.example").read_text()
    script = SCRIPT.read_text()
    in_script = set(re.findall(r"^(TPU_[A-Z_]+)=\$\{", script, flags=re.M))
    lines = example.splitlines()
    documented = {}
    for i, line in enumerate(lines):
        m = re.match(r"^(TPU_[A-Z_]+)=", line)
        if m:
            documented[m.group(1)] = lines[i - 1].startswith("#")
    assert set(documented) == in_script
    assert all(documented.values()), [k for k, v in documented.items() if not v]
    env = tmp_path / "env"
    env.write_text(example.replace("\nTPU_ZONE=\n", f"\nTPU_ZONE={ZONE}\n"))
    assert dry(tmp_path, env, "create") == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "jaxtrace-tpu",
            f"--zone={ZONE}",
            "--accelerator-type=v5p-8",
            "--version=v2-alpha-tpuv5",
        ]
    ]


def test_readme_covers_the_walkthrough():
    readme = (ROOT / "launch" / "README.md").read_text()
    for needle in (
        "gcloud auth login",
        "tpu.googleapis.com",
        "Quotas",
        "gcloud storage buckets",
        "cp launch/env.example launch/env",
        "launch/tpu_vm.sh create",
        "launch/tpu_vm.sh setup",
        "launch/tpu_vm.sh run --",
        "launch/tpu_vm.sh logs",
        "tensorboard --logdir gs://",
        "launch/tpu_vm.sh babysit",
        "launch/tpu_vm.sh delete",
        "python -m jaxtrace.export",
        "libtpu_lockfile",
        "PREEMPTED",
        "configs/qwen3_1p7b_trace.py",
        "configs/qwen3_8b_trace.py",
    ):
        assert needle in readme, needle


@pytest.mark.parametrize(
    "running,exit_code,log_tail,expected",
    [
        (True, None, "", "RUNNING"),
        (False, None, "", "NONE"),
        (False, "0", '{"steps": 10, "preempted": false}', "EXIT 0"),
        (False, "0", '{"steps": 10, "preempted": true}', "EXIT 0 preempted"),
        (False, "1", "Traceback ...", "EXIT 1"),
    ],
)
def test_the_job_status_line_on_worker_0(
    tmp_path, env_file, running, exit_code, log_tail, expected
):
    """Runs the status command babysit sends to worker 0 in a local bash (pgrep faked)."""
    script = remote(dry(tmp_path, env_file, "status")[-1])
    home, fake_bin = tmp_path / "home", tmp_path / "fakebin"
    (home / "jaxtrace_logs").mkdir(parents=True)
    fake_bin.mkdir()
    (fake_bin / "pgrep").write_text(f"#!/bin/sh\nexit {0 if running else 1}\n")
    (fake_bin / "pgrep").chmod(0o755)
    (home / "jaxtrace_logs" / "worker-0.log").write_text(f"step 9\n{log_tail}\n")
    if exit_code is not None:
        (home / "jaxtrace_logs" / "worker-0.exit").write_text(exit_code + "\n")
    out = subprocess.run(
        ["bash", "-c", script],
        env=_env(tmp_path, fake_bin, HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert out.strip() == expected


def test_every_remote_script_is_valid_bash(tmp_path, env_file):
    scripts = []
    for args in (
        ["setup"],
        ["run", "--", *TRICKY_ARGS],
        ["logs", "--worker=all", "-f"],
        ["status"],
        ["babysit", "--accelerator-type=v5p-64", "--", "--config=c.py"],
    ):
        scripts += [
            remote(c)
            for c in dry(tmp_path, env_file, *args)
            if c[0] == "gcloud" and any(a.startswith("--command=") for a in c)
        ]
    assert len(scripts) >= 10
    for script in scripts:
        r = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert r.returncode == 0, (script, r.stderr)


def test_an_explicit_distributed_choice_is_kept(tmp_path, env_file):
    for flag in ("--nodistributed", "--distributed=false"):
        launch = remote(
            dry(
                tmp_path, env_file, "run", "--accelerator-type=v5p-64", "--", "--config=c.py", flag
            )[-1]
        )
        assert f"-m jaxtrace.train --config=c.py {flag};" in launch


# --------------------------------------------------------------------------------- preflight
def test_preflight_runs_the_aot_compile_here(tmp_path, env_file):
    (cmd,) = dry(
        tmp_path, env_file, "preflight", "--accelerator-type=v5p-8", "--",
        "--config=configs/qwen3_1p7b_trace.py", "--distributed",
    )  # fmt: skip
    assert cmd[:3] == ["env", "-C", str(SCRIPT.parent.parent)]
    assert cmd[3:] == [
        "python3", "-m", "jaxtrace.compile", "--topology=v5p-8",
        "--config=configs/qwen3_1p7b_trace.py",
    ]  # fmt: skip


def test_create_runs_preflight_first_unless_told_not_to(tmp_path, env_file):
    args = ["create", "--accelerator-type=v5p-8", "--", "--config=configs/qwen3_1p7b_trace.py"]
    cmds = dry(tmp_path, env_file, *args)
    assert [c[3:6] for c in cmds[:1]] == [["python3", "-m", "jaxtrace.compile"]]
    assert cmds[1][:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
    cmds = dry(tmp_path, env_file, "--no-preflight", *args)
    assert len(cmds) == 1 and cmds[0][0] == "gcloud"


def test_failed_preflight_creates_nothing(tmp_path, env_file):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gcloud-was-called"
    (bin_dir / "gcloud").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (bin_dir / "python3").write_text("#!/bin/sh\necho 'rl_step  does not fit'\nexit 1\n")
    for f in ("gcloud", "python3"):
        (bin_dir / f).chmod(0o755)
    r = _script(
        "create", "--accelerator-type=v5p-8", "--", "--config=configs/qwen3_1p7b_trace.py",
        env_file=env_file, tmp_path=tmp_path, bin_dir=bin_dir,
    )  # fmt: skip
    assert r.returncode == 1 and "preflight" in r.stderr and not marker.exists()
