"""Every command in the ```bash blocks of README.md and launch/README.md is either run here as a
subprocess, through bash, as written (tiny sizes only through the README's documented
`--config.<key>=<value>` overrides, appended: a later override wins), or listed in SKIP with
the reason it cannot run on a CPU test machine. A command added to a README without an entry
here fails `test_every_readme_command_is_run_or_skipped`.

The commands run in one scratch folder shared by the module (the README's relative paths,
`configs/` linked in, `launch/` copied so that `cp launch/env.example launch/env` writes there),
with `python` on PATH meaning this interpreter and the environment a user has: JAX on CPU, one
device. The first training command's run (runs/tiny) is made once and read by eval and export.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "launch/README.md")

# Tiny sizes for every training command, through documented overrides (appended, so they win).
SMOKE = (
    "--config.model.hidden_size=32 --config.model.intermediate_size=64 "
    "--config.model.num_layers=1 --config.model.num_heads=2 --config.model.num_kv_heads=1 "
    "--config.model.head_dim=16 --config.data.num_train=64 --config.data.num_test=8 "
    "--config.rollout.prompts_per_step=2 --config.rollout.group_size=2 "
    "--config.sft.steps=2 --config.sft.batch_size=8 --config.train.steps=2 "
    "--config.train.log_every=1 --config.train.ckpt_every=1 --config.eval.batch_size=8 "
    "--config.train.progress=False"
)

TRAIN_TINY = "python -m jaxtrace.train --config=configs/tiny.py"
TRAIN_RKL = (
    "python -m jaxtrace.train --config=configs/tiny.py:trace_rkl --config.workdir=runs/tiny_rkl"
)
TRAIN_GRPO = (
    "python -m jaxtrace.train --config=configs/tiny.py:grpo --config.workdir=runs/tiny_grpo"
)
TRAIN_L05 = (
    "python -m jaxtrace.train --config=configs/tiny.py --config.workdir=runs/tiny_l05 "
    "--config.train.steps=100 --config.algo.kl_lambda0=0.5"
)
TRAIN_STATIC = (
    "python -m jaxtrace.train --config=configs/tiny.py --config.rollout.engine=static "
    "--config.workdir=runs/tiny_static"
)
TRAIN_PPO = (
    "python -m jaxtrace.train --config=configs/tiny.py:grpo --config.algo.num_minibatches=4 "
    "--config.algo.ref_kl_coef=0.04 --config.workdir=runs/tiny_grpo_ppo"
)
EVAL_TINY = "python -m jaxtrace.eval --ckpt=runs/tiny/ckpt --sets=arithmetic"
EXPORT_TINY = "python -m jaxtrace.export --ckpt=runs/tiny/ckpt --out=hf_out"

# command -> appends SMOKE (a training run); a string: SMOKE and then these overrides too
RUN = {
    TRAIN_TINY: True,
    TRAIN_RKL: True,
    TRAIN_GRPO: True,
    TRAIN_L05: True,
    TRAIN_PPO: "--config.rollout.prompts_per_step=4",  # 4 mini-batches of whole groups
    TRAIN_STATIC: True,
    "python -m jaxtrace.train --help": False,
    EVAL_TINY: False,
    EXPORT_TINY: False,
    "launch/tpu_vm.sh --help": False,
    "cp launch/env.example launch/env": False,
}

_GCLOUD = "needs the gcloud CLI, a login and a GCP project"
_TPU = (
    "drives real TPU VMs through gcloud; tests/test_launch.py runs the script's commands under "
    "--dry-run and against a fake gcloud"
)
_ENV_LINE = "a line of the launch/env file shown in the README, not a command"
_AOT_17B = (
    "compiles every Qwen3-1.7B program for v5p-8 (about 10 minutes on 2 cores; "
    "benchmarks/tpu_preflight.py records it); the same CLI runs on the tiny config in "
    "tests/test_tpu_compile.py, and tests/test_launch.py checks preflight's command"
)
SKIP = {
    "make train": (
        "the full run (9 min) that also builds .venv in the checkout; its trainer command is "
        f"{TRAIN_TINY!r}, run here with tiny sizes"
    ),
    "make test": "the test suite itself",
    "make venv": "builds .venv in the checkout (the set-up `make test` itself ran)",
    "python -m jaxtrace.compile --config=configs/tiny.py --topology=v5e-4 "
    "--config.model.num_layers=2": (
        "run as written, read from README.md, by "
        "tests/test_tpu_compile.py::test_compile_cli_prints_the_table (it needs libtpu)"
    ),
    "python -m jaxtrace.compile --config=configs/qwen3_1p7b_trace.py --topology=v5p-8": _AOT_17B,
    "launch/tpu_vm.sh preflight --accelerator-type=v5p-8 -- "
    "--config=configs/qwen3_1p7b_trace.py": _AOT_17B,
    "launch/tpu_vm.sh create -- --config=configs/qwen3_1p7b_trace.py": _TPU,
    "python -m jaxtrace.eval --ckpt=runs/q17/ckpt --data_dir=../shared/data/math_eval "
    "--sets=math500,aime24,aime25,amc2023,minervamath,olympiadbench --k=4 --temperature=0.6": (
        "needs a Qwen3-1.7B run in runs/q17 and the math_eval sets; the same CLI runs above on "
        "runs/tiny"
    ),
    "python -m jaxtrace.export --from_hf=/path/to/Qwen3-1.7B --out=q17": (
        "placeholder path to a Qwen3-1.7B download; tests/test_export_cli.py runs --from_hf on a "
        "tiny HF folder and reads the result back with --ckpt"
    ),
    "launch/tpu_vm.sh --dry-run <command>": "<command> is a placeholder",
    "gcloud auth login": _GCLOUD,
    "gcloud auth application-default login": _GCLOUD,
    "gcloud config set project MY_PROJECT": _GCLOUD,
    "gcloud services enable tpu.googleapis.com compute.googleapis.com storage.googleapis.com": (
        _GCLOUD
    ),
    "gcloud beta services identity create --service tpu.googleapis.com": _GCLOUD,
    "gcloud compute tpus locations list": _GCLOUD,
    "gcloud compute tpus accelerator-types list --zone=us-east5-a": _GCLOUD,
    "gcloud storage buckets create gs://MY_BUCKET --location=us-east5 "
    "--uniform-bucket-level-access": _GCLOUD,
    "SA=$(gcloud iam service-accounts list --filter='displayName:Compute Engine default' "
    "--format='value(email)')": _GCLOUD,
    "gcloud storage buckets add-iam-policy-binding gs://MY_BUCKET "
    "--member=serviceAccount:$SA --role=roles/storage.objectAdmin": _GCLOUD,
    "$EDITOR launch/env": "opens an interactive editor",
    "TPU_NAME=trace-v5p-64": _ENV_LINE,
    "TPU_PROJECT=MY_PROJECT": _ENV_LINE,
    "TPU_ZONE=us-east5-a": _ENV_LINE,
    "TPU_ACCELERATOR_TYPE=v5p-64": _ENV_LINE,
    "TPU_SPOT=1": _ENV_LINE,
    'TPU_SETUP_EXTRA=\'sudo mkdir -p /data && sudo chown "$USER" /data && '
    "~/jaxtrace_venv/bin/hf download Qwen/Qwen3-8B --local-dir /data/Qwen3-8B && "
    "gcloud storage cp -r gs://MY_BUCKET/data/gsm8k /data/'": _ENV_LINE,
    "launch/tpu_vm.sh create": _TPU,
    "launch/tpu_vm.sh create --queued": _TPU,
    "launch/tpu_vm.sh setup": _TPU,
    "launch/tpu_vm.sh run -- --config=configs/qwen3_1p7b_trace.py "
    "--config.workdir=gs://MY_BUCKET/runs/qwen3_1p7b_trace --config.init_from=hf:/data/Qwen3-1.7B "
    "--config.data.tokenizer=/data/Qwen3-1.7B": _TPU,
    "launch/tpu_vm.sh run -- --config=configs/qwen3_8b_trace.py "
    "--config.workdir=gs://MY_BUCKET/runs/qwen3_8b_trace --config.init_from=hf:/data/Qwen3-8B "
    "--config.data.tokenizer=/data/Qwen3-8B --config.data.train_path=/data/gsm8k/train.jsonl "
    "--config.data.test_path=/data/gsm8k/test.jsonl": _TPU,
    "launch/tpu_vm.sh logs": _TPU,
    "launch/tpu_vm.sh logs --follow": _TPU,
    "launch/tpu_vm.sh logs --worker=all --lines=20": _TPU,
    "launch/tpu_vm.sh status": _TPU,
    "launch/tpu_vm.sh ssh --worker=3": _TPU,
    "launch/tpu_vm.sh ssh --worker=all -- 'pgrep -af jaxtrace.train; free -g | head -2'": _TPU,
    "pip install tensorboard": "installs a package",
    "tensorboard --logdir gs://MY_BUCKET/runs/qwen3_8b_trace/tb": (
        "a long-running server reading a GCS bucket"
    ),
    "launch/tpu_vm.sh babysit --max-retries=20 --interval=120 -- "
    "--config=configs/qwen3_8b_trace.py --config.workdir=gs://MY_BUCKET/runs/qwen3_8b_trace "
    "--config.init_from=hf:/data/Qwen3-8B --config.data.tokenizer=/data/Qwen3-8B": _TPU,
    "launch/tpu_vm.sh ssh --worker=0 -- 'cd ~/jaxtrace && JAX_PLATFORMS=cpu "
    "~/jaxtrace_venv/bin/python -m jaxtrace.export "
    "--ckpt=gs://MY_BUCKET/runs/qwen3_8b_trace/ckpt --out=/data/qwen3_8b_trace_hf && "
    "gcloud storage cp -r /data/qwen3_8b_trace_hf gs://MY_BUCKET/export/'": _TPU,
    "launch/tpu_vm.sh delete": _TPU,
    "gcloud compute tpus tpu-vm list --zone=us-east5-a": _GCLOUD,
    "gcloud compute tpus queued-resources list --zone=us-east5-a": _GCLOUD,
}


def _strip_comment(line: str) -> str:
    """`line` without a bash comment (a `#` at a word start, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def bash_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks of a markdown text: continuation lines joined,
    comment-only lines dropped, a trailing `# comment` and repeated blanks removed."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            line = _strip_comment(line).strip()
            if line and not line.startswith("#"):
                out.append(" ".join(line.split()))
    return out


def documented() -> list[str]:
    return [c for doc in DOCS for c in bash_commands((REPO / doc).read_text())]


def test_command_extraction_joins_continuations_and_drops_comments():
    text = "x\n```bash\na --b \\\n    --c  # note\n# only a comment\n\nd 'e # f'\n```\n"
    assert bash_commands(text) == ["a --b --c", "d 'e # f'"]


def test_every_readme_command_is_run_or_skipped():
    cmds = documented()
    assert TRAIN_TINY in cmds and len(cmds) > 40
    unknown = [c for c in cmds if c not in RUN and c not in SKIP]
    assert not unknown, f"README commands neither run nor skipped (add them here): {unknown}"
    stale = [c for c in list(RUN) + list(SKIP) if c not in cmds]
    assert not stale, f"entries for commands no README shows any more: {stale}"
    assert not set(RUN) & set(SKIP)
    assert all(isinstance(r, str) and len(r) > 10 for r in SKIP.values())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("readme")
    (ws / "configs").symlink_to(REPO / "configs")
    shutil.copytree(REPO / "launch", ws / "launch", ignore=shutil.ignore_patterns("env"))
    bin_dir = ws / ".bin"
    bin_dir.mkdir()
    python = bin_dir / "python"  # a wrapper, not a link: a link to a venv's python loses the venv
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "TPU_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        PYTHONPATH=str(REPO),
        JAX_PLATFORMS="cpu",
        # One compile for the four training commands (same shapes); not a behaviour change.
        JAX_COMPILATION_CACHE_DIR=str(ws / ".jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return ws, env


def run_command(cmd: str, workspace, timeout: int = 600) -> subprocess.CompletedProcess:
    ws, env = workspace
    extra = RUN.get(cmd)
    line = f"{cmd} {SMOKE}" if extra is True else (f"{cmd} {SMOKE} {extra}" if extra else cmd)
    return subprocess.run(
        ["bash", "-c", line],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny_run(workspace):
    """The README's first training command (tiny sizes), once for the module."""
    return run_command(TRAIN_TINY, workspace)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc.stdout


def _run_config(ws: Path, workdir: str) -> dict:
    return json.loads((ws / workdir / "config.json").read_text())


def _last_json(stdout: str) -> dict:
    return json.loads([s for s in stdout.splitlines() if s.startswith("{")][-1])


@pytest.mark.slow
def test_train_tiny(tiny_run, workspace):
    out = _ok(tiny_run)
    assert "before RL" in out and "after RL" in out
    assert _last_json(out)["steps"] == 2
    ws = workspace[0]
    assert sorted(os.listdir(ws / "runs/tiny/ckpt"))[:2] == ["1", "2"]
    assert not (ws / "runs/tiny/jaxtrace.lock").exists()  # released at the end


@pytest.mark.slow
def test_train_tiny_rerun_resumes_and_logs_it(tiny_run, workspace):
    """A rerun resumes from the last checkpoint, and the trainer's INFO line says so."""
    _ok(tiny_run)
    proc = run_command(TRAIN_TINY, workspace)
    out = _ok(proc)
    assert "resumed from step 2" in proc.stderr, proc.stderr[-3000:]
    assert _last_json(out)["steps"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "cmd, workdir, expected",
    [
        (TRAIN_RKL, "runs/tiny_rkl", {"rkl_on_error_spans": True, "fkl_on_key_spans": False}),
        (TRAIN_GRPO, "runs/tiny_grpo", {"name": "grpo"}),
        (TRAIN_L05, "runs/tiny_l05", {"kl_lambda0": 0.5}),
        (TRAIN_PPO, "runs/tiny_grpo_ppo", {"num_minibatches": 4, "ref_kl_coef": 0.04}),
    ],
    ids=["trace_rkl", "grpo", "lambda0.5", "ppo_minibatches"],
)
def test_train_variant(cmd, workdir, expected, workspace):
    out = _ok(run_command(cmd, workspace))
    assert "after RL" in out
    run = _run_config(workspace[0], workdir)
    assert {k: run["algo"][k] for k in expected} == expected
    assert run["train"]["steps"] == 2  # SMOKE, appended, wins over the command's 100


@pytest.mark.slow
def test_train_static_engine(workspace):
    out = _ok(run_command(TRAIN_STATIC, workspace))
    assert "after RL" in out
    assert _run_config(workspace[0], "runs/tiny_static")["rollout"]["engine"] == "static"


@pytest.mark.slow
def test_eval_tiny(tiny_run, workspace):
    _ok(tiny_run)
    out = _ok(run_command(EVAL_TINY, workspace))
    assert "checkpoint runs/tiny/ckpt step 2" in out
    row = [s.split() for s in out.splitlines() if s.strip().startswith("arithmetic")]
    assert row and row[0][1] == "8", out  # n = the run's 8 held-out problems


@pytest.mark.slow
def test_eval_decodes_on_a_mesh_and_names_a_bad_one(tiny_run, workspace):
    """On 8 devices the eval CLI restores the params onto the run's mesh (data=-1) and splits
    each batch over it: the greedy answers, so the scores, are those of one device."""
    _ok(tiny_run)
    ws, env = workspace
    env8 = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}

    def run(*flags):
        cmd = [sys.executable, "-m", "jaxtrace.eval", "--ckpt=runs/tiny/ckpt", *flags]
        return subprocess.run(cmd, cwd=ws, env=env8, capture_output=True, text=True, timeout=600)

    def score_row(out):
        return next(s.split() for s in out.splitlines() if s.strip().startswith("arithmetic"))

    one = _ok(run_command(EVAL_TINY, workspace))
    for flags in ([], ["--mesh=data=2,fsdp=-1"]):
        assert score_row(_ok(run("--sets=arithmetic", *flags))) == score_row(one)
    for bad, named in [("--mesh=tensor=3", "--mesh"), ("--mesh=data", "--mesh='data'")]:
        proc = run("--sets=arithmetic", bad)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_export_tiny(tiny_run, workspace):
    _ok(tiny_run)
    out = _ok(run_command(EXPORT_TINY, workspace))
    assert "wrote HF folder hf_out from step 2 of runs/tiny/ckpt" in out
    hf_out = workspace[0] / "hf_out"
    assert json.loads((hf_out / "config.json").read_text())["num_hidden_layers"] == 1
    assert (hf_out / "model.safetensors").stat().st_size > 0


_WITHOUT_EXTRAS = """
import runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None  # as if not installed: import fails, find_spec says absent
sys.argv = ["jaxtrace.train", *sys.argv[1:]]
runpy.run_module("jaxtrace.train", run_name="__main__", alter_sys=True)
"""
EXTRAS = ("torch", "transformers", "tokenizers", "grain", "tensorflow", "tensorflow_datasets")
EXTRAS += ("gcsfs", "fsspec", "matplotlib", "pytest")


@pytest.mark.slow
def test_training_needs_only_the_base_install(workspace):
    """`make train` installs the package without extras; the training command runs without
    torch, transformers, grain, tensorflow-datasets, gcsfs, fsspec, matplotlib."""
    ws, env = workspace
    script = ws / "without_extras.py"
    script.write_text(_WITHOUT_EXTRAS.format(blocked=EXTRAS))
    cmd = f"python {script} --config=configs/tiny.py --config.workdir=runs/base_only {SMOKE}"
    proc = subprocess.run(
        ["bash", "-c", cmd], cwd=ws, env=env, capture_output=True, text=True, timeout=600
    )
    assert "after RL" in _ok(proc)


@pytest.mark.parametrize("module", ["train", "eval", "export"])
def test_help_exits_0(module, workspace):
    cmd = f"python -m jaxtrace.{module} --help"
    if module == "train":
        assert cmd in RUN
    proc = run_command(cmd, workspace)
    out = _ok(proc)
    flag = {"train": "--config", "eval": "--ckpt", "export": "--from_hf"}[module]
    assert flag in out, out[-2000:]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_launch_help(workspace):
    out = _ok(run_command("launch/tpu_vm.sh --help", workspace))
    assert "babysit" in out and "--dry-run" in out


def test_copy_env_example(workspace):
    ws = workspace[0]
    _ok(run_command("cp launch/env.example launch/env", workspace))
    assert (ws / "launch/env").read_text() == (REPO / "launch/env.example").read_text()
