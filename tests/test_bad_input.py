"""Bad configurations and bad files get one clear error naming the key or file, before any
compute, and exit code 2 from the CLIs (issue 18). One test per defect found.

In-process tests call the library (`trainer.run`, `export.hf_to_orbax`, the readers) and check the
error type (a `jaxtrace.errors.UsageError`, which the CLIs turn into exit 2) and message; the
subprocess tests check that mapping once per tool.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from jaxtrace import export, sharding, trainer
from jaxtrace.config import ConfigError, model_config, validate
from jaxtrace.data import tasks
from jaxtrace.errors import InputError, UsageError
from jaxtrace.models import hf
from tests.test_train import mini_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jsonl_config(tmp_path, train_text: str | bytes, name="train.jsonl"):
    path = tmp_path / name
    if isinstance(train_text, bytes):
        path.write_bytes(train_text)
    else:
        path.write_text(train_text)
    c = mini_config(tmp_path / "run")
    c.data.update(task="jsonl", train_path=str(path), num_train=0, num_test=0)
    c.algo.annotator = "none"
    return c


def _fails_before_compute(c, match, error=UsageError):
    with pytest.raises(error, match=match):
        trainer.run(c)
    run = os.path.join(c.workdir)
    for made_by_compute in ("ckpt", "sft", "tokenizer.model", "metrics.jsonl"):
        assert not os.path.exists(os.path.join(run, made_by_compute)), made_by_compute


GOOD_ROW = {"problem": "1+1?", "answer": "2"}


# ------------------------------------------------------------------ config values
@pytest.mark.parametrize(
    "key, value, match",
    [
        ("sft.batch_size", 0, r"sft.batch_size=0 must be >= 1"),
        ("train.ckpt_every", 0, r"train.ckpt_every=0 must be >= 1"),
        ("train.log_every", 0, r"train.log_every=0 must be >= 1"),
        ("train.keep_ckpts", 0, r"train.keep_ckpts=0 must be >= 1"),
        ("data.vocab_size", 5, r"data.vocab_size=5 must be >= 32"),
        ("data.num_train", -1, r"data.num_train=-1 must be >= 0"),
        ("data.num_test", -3, r"data.num_test=-3 must be >= 0"),
        ("rollout.temperature", math.inf, r"rollout.temperature=inf must be a finite number"),
        ("eval.temperature", math.nan, r"eval.temperature=nan must be a finite number"),
        ("eval.batch_size", 0, r"eval.batch_size=0 must be >= 1"),
        ("rollout.top_p", 1.5, r"rollout.top_p=1.5 must be > 0 and <= 1"),
        ("optim.b2", 1.5, r"optim.b2=1.5 must be >= 0 and <= 1"),
        ("verifier.timeout_s", 0.0, r"verifier.timeout_s=0.0 must be > 0"),
        ("train.max_consecutive_nonfinite", 0, r"must be >= 1"),
    ],
)
def test_bounded_config_value_is_rejected_naming_the_key(tmp_path, key, value, match):
    c = mini_config(tmp_path / "run")
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=match):
        validate(c)


def test_zero_arithmetic_training_set_is_rejected(tmp_path):
    c = mini_config(tmp_path / "run")
    c.data.num_train = 0
    with pytest.raises(ConfigError, match="data.num_train=0"):
        validate(c)


def test_workdir_that_is_a_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    _fails_before_compute(mini_config(tmp_path / "run"), r"workdir=.*run' is a file")


def test_init_from_missing_ckpt_does_not_create_the_directory(tmp_path):
    c = mini_config(tmp_path / "run")
    c.init_from = f"ckpt:{tmp_path / 'missing'}"
    _fails_before_compute(c, r"init_from=.*missing' is not a directory")
    assert not (tmp_path / "missing").exists()
    assert not (tmp_path / "run").exists()  # checked before the workdir is made


# ------------------------------------------------------------------ data files
def test_empty_training_set_is_an_error_naming_the_file(tmp_path):
    c = _jsonl_config(tmp_path, "\n\n")
    _fails_before_compute(c, r"data.train_path=.*train.jsonl' holds no examples")


@pytest.mark.parametrize("line, kind", [("[1, 2]", "list"), ("null", "NoneType"), ("3", "int")])
def test_jsonl_line_that_is_not_an_object_names_file_and_line(tmp_path, line, kind):
    c = _jsonl_config(tmp_path, json.dumps(GOOD_ROW) + "\n" + line + "\n")
    _fails_before_compute(c, rf"train.jsonl:2: expected a JSON object, got {kind}")


def test_directory_as_data_path_is_an_error_naming_it(tmp_path):
    c = _jsonl_config(tmp_path, "")
    (tmp_path / "adir").mkdir()
    c.data.train_path = str(tmp_path / "adir")
    _fails_before_compute(c, r"data.train_path=.*adir' is not a file")


def test_non_utf8_data_names_the_file(tmp_path):
    bad = json.dumps(GOOD_ROW).encode() + b"\n" + b'{"problem": "\xff\xfe", "answer": "1"}\n'
    c = _jsonl_config(tmp_path, bad)
    _fails_before_compute(c, r"data file .*train.jsonl' is not UTF-8 text")


@pytest.mark.parametrize(
    "row, match",
    [
        ({"problem": "q", "answer": "1", "solution": ["a", "b"]}, r"field 'solution' must be"),
        ({"problem": "q", "answer": None}, r"row 0 field 'answer' must be .* got null"),
        ({"problem": "q", "answer": True}, r"field 'answer'"),
        ({"problem": ["q"], "answer": "1"}, r"field 'problem'"),
    ],
    ids=["solution-list", "answer-null", "answer-bool", "problem-list"],
)
def test_bad_field_types_are_errors_naming_file_row_and_field(tmp_path, row, match):
    c = _jsonl_config(tmp_path, json.dumps(row) + "\n")
    _fails_before_compute(c, match)


def test_good_math_rows_still_load(tmp_path):
    path = tmp_path / "ok.jsonl"
    rows = [
        GOOD_ROW,
        {"question": "q", "answer": 3},
        {"problem": "p", "answer": "x", "solution": ""},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = tasks.math_examples(str(path))
    assert [e.answer for e in ex] == ["2", "3", "x"]
    assert ex[2].reference == "The answer is $\\boxed{x}$."


# ------------------------------------------------------------------ HF folders
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny Qwen3 HF folder written by jaxtrace itself (no torch needed)."""
    cfg = model_config(mini_config("/unused"))
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    _, params = sharding.init_sharded(cfg, mesh, seed=0)
    out = tmp_path_factory.mktemp("hf") / "good"
    hf.save_hf(cfg, params, str(out))
    return out


def _broken_copy(hf_folder, tmp_path, how):
    import shutil

    d = tmp_path / how
    shutil.copytree(hf_folder, d)
    st = d / "model.safetensors"
    data = st.read_bytes()
    if how == "truncated":
        st.write_bytes(data[: len(data) // 2])
    elif how == "header-only":
        n = int.from_bytes(data[:8], "little")
        st.write_bytes(data[: 8 + n])
    elif how == "pickle":  # what a torch .bin holds: a pickle, here of {'a': 1}
        st.write_bytes(b"\x80\x04\x95\x0a\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s.")
    elif how == "config-missing-key":
        cfg = json.loads((d / "config.json").read_text())
        del cfg["hidden_size"]
        (d / "config.json").write_text(json.dumps(cfg))
    elif how == "config-not-json":
        (d / "config.json").write_text("{'hidden_size': 32,")
    return d


@pytest.mark.parametrize(
    "how, match",
    [
        ("truncated", r"not valid safetensors"),
        ("header-only", r"not valid safetensors"),
        ("pickle", r"not valid safetensors"),
        ("config-missing-key", r"config.json has no key 'hidden_size'"),
        ("config-not-json", r"is not valid JSON"),
    ],
)
def test_bad_hf_folder_is_an_input_error_naming_it(hf_folder, tmp_path, how, match):
    d = _broken_copy(hf_folder, tmp_path, how)
    with pytest.raises(InputError, match=match) as e:
        export.hf_to_orbax(str(d), str(tmp_path / "out"))
    assert str(d) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_good_hf_folder_round_trips_through_the_run_folder_layout(hf_folder, tmp_path):
    """`export --from_hf=DIR --out=X` writes X/ckpt + X/config.json; `--ckpt=X` reads X back."""
    out = tmp_path / "X"
    export.hf_to_orbax(str(hf_folder), str(out))
    assert sorted(os.listdir(out)) == ["ckpt", "config.json"]
    step = export.orbax_to_hf(str(out), str(tmp_path / "hf2"))
    assert step == 0
    _, _, a = hf.load_hf(str(hf_folder))
    _, _, b = hf.load_hf(str(tmp_path / "hf2"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert (x == y).all()
    assert export.resolve_run(str(out)) == (str(out / "ckpt"), str(out / "config.json"))
    ckpt_dir = str(out / "ckpt")
    assert export.resolve_run(ckpt_dir) == (ckpt_dir, str(out / "config.json"))


# ------------------------------------------------------------------ the CLIs: exit 2
def _cli(module, *args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", f"jaxtrace.{module}", *args],
        cwd=cwd,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line_exit_2(out, expected):
    errors = [s for s in out.stderr.splitlines() if s.startswith("error:")]
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(errors) == 1 and expected in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr


def test_cli_train_bad_data_file_exit_2_naming_it(tmp_path):
    (tmp_path / "t.jsonl").write_text("[1]\n")
    out = _cli(
        "train",
        "--config=configs/tiny.py",
        f"--config.workdir={tmp_path / 'run'}",
        "--config.data.task=jsonl",
        f"--config.data.train_path={tmp_path / 't.jsonl'}",
        "--config.algo.annotator=none",
    )
    _one_line_exit_2(out, "t.jsonl:1: expected a JSON object, got list")


def test_cli_train_log_every_0_exit_2(tmp_path):
    out = _cli(
        "train",
        "--config=configs/tiny.py",
        f"--config.workdir={tmp_path / 'run'}",
        "--config.train.log_every=0",
    )
    _one_line_exit_2(out, "train.log_every=0 must be >= 1")


def test_cli_export_pickle_weights_exit_2(hf_folder, tmp_path):
    d = _broken_copy(hf_folder, tmp_path, "pickle")
    out = _cli("export", f"--from_hf={d}", f"--out={tmp_path / 'o'}")
    _one_line_exit_2(out, "not valid safetensors")


def test_cli_eval_corrupt_run_config_exit_2_naming_it(tmp_path):
    (tmp_path / "run" / "ckpt").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text("{")
    out = _cli("eval", f"--ckpt={tmp_path / 'run' / 'ckpt'}", "--sets=arithmetic")
    _one_line_exit_2(out, f"run config '{tmp_path / 'run' / 'config.json'}' is not valid JSON")


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json"])
def test_corrupt_tokenizer_is_an_input_error_naming_it(tmp_path, name):
    from jaxtrace.data import tokenizer  # noqa: PLC0415

    path = tmp_path / name
    path.write_bytes(b"\x00\x01 not a tokenizer \xff")
    with pytest.raises(InputError, match=rf"{name}' cannot be loaded"):
        tokenizer.load(str(path))
