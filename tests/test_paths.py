"""jaxtrace.paths with fsspec `memory://` and `file://` standing in for GCS, and the gs:// branch
(credentials from the environment only: token="google_default", never anonymous)."""

import io
import json
import os
import uuid

import pytest

from jaxtrace import paths
from jaxtrace.data import tasks

fsspec = pytest.importorskip("fsspec")


@pytest.fixture
def mem_root():
    """A fresh directory on fsspec's process-global memory filesystem, removed afterwards."""
    root = f"memory://jaxtrace_test_{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(params=["memory", "file"])
def remote_root(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/remote"
    return request.getfixturevalue("mem_root")


def test_is_remote():
    assert paths.is_remote("gs://b/x") and paths.is_remote("memory://x")
    assert paths.is_remote("file:///tmp/x")
    assert not paths.is_remote("/tmp/x") and not paths.is_remote("runs/tiny")


def test_join():
    assert paths.join("gs://bucket/run", "ckpt", "3") == "gs://bucket/run/ckpt/3"
    assert paths.join("gs://bucket/run/", "tb") == "gs://bucket/run/tb"
    assert paths.join("memory://a", "b.json") == "memory://a/b.json"
    assert paths.join("runs/tiny", "ckpt") == os.path.join("runs/tiny", "ckpt")


def test_remote_makedirs_open_exists(remote_root):
    run = paths.join(remote_root, "run", "sub")
    assert not paths.exists(run)
    paths.makedirs(run)
    paths.makedirs(run)  # exist_ok
    target = paths.join(run, "config.json")
    assert not paths.exists(target)
    with paths.open_path(target, "w") as f:
        f.write(json.dumps({"lr": 1e-5}))
    assert paths.exists(target)
    with paths.open_path(target) as f:
        assert json.load(f) == {"lr": 1e-5}
    with paths.open_path(paths.join(run, "blob.bin"), "wb") as f:
        f.write(b"\x00\x01\xff")
    with paths.open_path(paths.join(run, "blob.bin"), "rb") as f:
        assert f.read() == b"\x00\x01\xff"
    with paths.open_path(target, "a") as f:  # metrics.jsonl is appended to
        f.write("\n")
    with paths.open_path(target) as f:
        assert f.read().endswith("}\n")


def test_file_url_writes_the_local_file(tmp_path):
    url = f"file://{tmp_path}/out/x.txt"
    paths.makedirs(f"file://{tmp_path}/out")
    with paths.open_path(url, "w") as f:
        f.write("hello")
    assert (tmp_path / "out" / "x.txt").read_text() == "hello"


def test_local_paths(tmp_path):
    d = str(tmp_path / "a" / "b")
    paths.makedirs(d)
    assert os.path.isdir(d) and paths.exists(d)
    with paths.open_path(paths.join(d, "f.txt"), "w") as f:
        f.write("x")
    assert paths.exists(paths.join(d, "f.txt")) and not paths.exists(paths.join(d, "g"))


class _FakeGCS:
    """Records what `fsspec.filesystem` was asked for; serves files from a dict."""

    def __init__(self, protocol, **kwargs):
        self.protocol, self.kwargs = protocol, kwargs
        self.files, self.dirs = {}, set()

    def open(self, path, mode="r"):
        if "r" in mode:
            data = self.files[path]
            return io.StringIO(data) if "b" not in mode else io.BytesIO(data.encode())
        buf = io.StringIO()
        buf.close = lambda: self.files.__setitem__(path, buf.getvalue())
        return buf

    def makedirs(self, path, exist_ok=False):
        self.dirs.add(path)

    def exists(self, path):
        return path in self.files or path in self.dirs


@pytest.fixture
def fake_fsspec(monkeypatch):
    made = []

    def filesystem(protocol, **kwargs):
        fs = _FakeGCS(protocol, **kwargs)
        made.append(fs)
        return fs

    monkeypatch.setattr(fsspec, "filesystem", filesystem)
    return made


@pytest.mark.parametrize("scheme", ["gs", "gcs"])
def test_gcs_uses_environment_credentials_only(fake_fsspec, scheme):
    url = f"{scheme}://bucket/run/x.txt"
    paths.makedirs(f"{scheme}://bucket/run")
    paths.exists(url)
    with paths.open_path(url, "w") as f:
        f.write("data")
    assert len(fake_fsspec) == 3
    for fs in fake_fsspec:
        assert fs.protocol == scheme
        # Exactly the environment's credentials: no anon=True, no token=None / "anon" fallback.
        assert fs.kwargs == {"token": "google_default"}


def test_other_protocols_get_no_gcs_token(fake_fsspec):
    paths.exists("memory://x/y")
    paths.exists("s3://bucket/y")
    assert [(fs.protocol, fs.kwargs) for fs in fake_fsspec] == [("memory", {}), ("s3", {})]


def test_gcs_read_jsonl_through_fake_bucket(monkeypatch):
    store = _FakeGCS("gs", token="google_default")
    store.files["gs://b/train.jsonl"] = json.dumps({"question": "q", "answer": "1+1=2 #### 2"})
    monkeypatch.setattr(fsspec, "filesystem", lambda protocol, **kw: store)
    (e,) = tasks.gsm8k_examples("gs://b/train.jsonl")
    assert (e.question, e.answer) == ("q", "2")


def test_read_jsonl_from_memory(mem_root):
    url = paths.join(mem_root, "data", "train.jsonl")
    rows = [{"question": f"q{i}", "answer": f"{i}+0={i}. #### {i}"} for i in range(5)]
    with fsspec.open(url, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert tasks.read_jsonl(url) == rows
    assert tasks.read_jsonl(url, limit=2) == rows[:2]
    examples = tasks.gsm8k_examples(url)
    assert [e.answer for e in examples] == ["0", "1", "2", "3", "4"]


def test_read_jsonl_from_memory_reports_bad_line(mem_root):
    url = paths.join(mem_root, "bad.jsonl")
    with fsspec.open(url, "w") as f:
        f.write('{"problem": "p", "answer": "1"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        tasks.read_jsonl(url)


def test_tasks_load_accepts_remote_paths(mem_root):
    """Remote paths skip the local existence check and are read through fsspec."""
    from jaxtrace.config import base

    url = paths.join(mem_root, "math.jsonl")
    with fsspec.open(url, "w") as f:
        f.write(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    c = base()
    c.data.update(task="jsonl", train_path=url, test_path=url, num_train=0, num_test=0)
    train, test = tasks.load(c.data)
    assert train == test == [tasks.Example("1+1?", "The answer is $\\boxed{2}$.", "2")]


def test_checkpoint_relative_directory(tmp_path, monkeypatch):
    """A relative workdir (the default `runs/tiny`) saves and restores: Orbax itself only takes
    absolute paths."""
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from jaxtrace import checkpoint  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    state = {"params": {"w": jnp.arange(3.0)}, "step": jnp.int32(7)}
    ckpt = checkpoint.Checkpointer("runs/rel/ckpt", keep=1, async_save=True)
    ckpt.save(7, state, {"note": "x"}, force=True)
    ckpt.close()
    assert (tmp_path / "runs/rel/ckpt/7").is_dir()
    again = checkpoint.Checkpointer("runs/rel/ckpt", keep=1)
    restored, host = again.restore(None, state)
    again.close()
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    assert host == {"note": "x"}
    params, step = checkpoint.restore_params("runs/rel/ckpt", {"w": jnp.zeros(3)})
    assert step == 7
    np.testing.assert_array_equal(params["w"], state["params"]["w"])
