"""The notebooks run end to end on CPU with tiny settings (nbclient), and are committed clean."""

import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbformat (the [dev] extra)")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ["explore", "tpu_quickstart"]


def _read(name):
    return nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_and_committed_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for cell in code:
        assert not cell.outputs and cell.execution_count is None, (
            f"{name}.ipynb has outputs; clear them before committing"
        )


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernelspec for this interpreter, so the notebook runs in the same environment."""
    pytest.importorskip("nbclient", reason="notebook tests need nbclient (the [dev] extra)")
    pytest.importorskip("ipykernel", reason="notebook tests need ipykernel (the [dev] extra)")
    pytest.importorskip("matplotlib", reason="notebook tests need matplotlib (the [dev] extra)")
    spec = tmp_path / "jupyter" / "kernels" / "jaxtrace-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "jaxtrace test",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "jaxtrace-test"


def _execute(name, kernel_name, workdir):
    from nbclient import NotebookClient

    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXTRACE_NB_WORKDIR=str(workdir))
    # One CPU device, as a user's laptop has (conftest forces 8 for the sharding tests).
    env["XLA_FLAGS"] = " ".join(
        f
        for f in env.get("XLA_FLAGS", "").split()
        if "xla_force_host_platform_device_count" not in f
    )
    for key in ("JAXTRACE_RUN_DIR", "JAXTRACE_JAX_CACHE", "MPLBACKEND"):  # MPLBACKEND: inline plots
        env.pop(key, None)
    nb = _read(name)
    client = NotebookClient(
        nb, timeout=600, kernel_name=kernel_name, resources={"metadata": {"path": str(REPO)}}
    )
    client.execute(env=env)  # raises CellExecutionError naming the failing cell
    return nb


def _outputs(nb, output_type):
    return [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == output_type
    ]


@pytest.mark.slow
def test_explore_notebook_runs(kernel_name, tmp_path):
    nb = _execute("explore", kernel_name, tmp_path / "work")
    shown = [o.data for o in _outputs(nb, "display_data")]
    assert any("image/png" in d for d in shown), "no plot"
    html = "".join(d.get("text/html", "") for d in shown)
    assert "#9be39b" in html and "#f4a3a3" in html, "routed spans not coloured (FKL and RKL)"
    text = "".join(o.text for o in _outputs(nb, "stream"))
    assert "max |logits - torch logits|" in text and "loss=" in text
    rows = [json.loads(s) for s in open(tmp_path / "work" / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train/lambda" in r] == [1, 2, 3]


@pytest.mark.slow
def test_tpu_quickstart_notebook_runs(kernel_name, tmp_path):
    nb = _execute("tpu_quickstart", kernel_name, tmp_path / "work")
    text = "".join(o.text for o in _outputs(nb, "stream"))
    assert "skipping the install" in text  # the Colab TPU set-up is guarded off-TPU
    results = json.load(open(tmp_path / "work" / "run" / "results.json"))
    assert results["steps"] == 3 and "after" in results
