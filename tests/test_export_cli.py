"""`python -m jaxtrace.export` both ways, sharded HF loading, and bf16 compute."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")

from jaxtrace import sharding  # noqa: E402
from jaxtrace.models import forward_logits  # noqa: E402
from jaxtrace.models import hf as hf_io  # noqa: E402
from tests.hf_utils import tiny_qwen3, torch_logits  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _export(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "jaxtrace.export", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_hf_to_orbax_to_hf_roundtrip_loads_in_transformers(tmp_path):
    from transformers import Qwen3ForCausalLM

    model, hf_dir = tiny_qwen3(tmp_path, tie=False)
    out = _export(f"--from_hf={hf_dir}", f"--out={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr
    # --ckpt takes the folder --from_hf wrote (run/ckpt + run/config.json) as it is
    out = _export(f"--ckpt={tmp_path / 'run'}", f"--out={tmp_path / 'hf2'}")
    assert out.returncode == 0, out.stderr
    reloaded = Qwen3ForCausalLM.from_pretrained(tmp_path / "hf2").eval().float()
    ids = np.random.default_rng(0).integers(0, 97, (2, 7))
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(model, ids), atol=1e-6)


def test_export_cli_errors_exit_2(tmp_path):
    out = _export(f"--ckpt={tmp_path / 'nothing'}", f"--out={tmp_path / 'o'}")
    assert out.returncode == 2 and "error:" in out.stderr
    out = _export(f"--out={tmp_path / 'o'}")
    assert out.returncode == 2 and "exactly one of" in out.stderr


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)")
def test_sharded_hf_load(tmp_path):
    model, hf_dir = tiny_qwen3(tmp_path, heads=4, kv_heads=2, hidden=48)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg, graphdef, params = hf_io.load_hf(hf_dir, lambda c: sharding.param_shardings(c, mesh))
    spec = params["layers"][0]["self_attn"]["q_proj"].sharding.spec
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)  # [layers, ...]
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 6))
    ours = jax.jit(forward_logits, static_argnums=0)(graphdef, params, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(ours), torch_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_bfloat16_compute_close_to_float32(tmp_path):
    model, hf_dir = tiny_qwen3(tmp_path)
    _, g32, p32 = hf_io.load_hf(hf_dir)
    _, g16, p16 = hf_io.load_hf(hf_dir, dtype="bfloat16", param_dtype="bfloat16")
    assert p16["embed_tokens"].dtype == jnp.bfloat16
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 97, (2, 8)))
    a = np.asarray(forward_logits(g32, p32, ids))
    b = np.asarray(forward_logits(g16, p16, ids))
    assert b.dtype == np.float32  # logits are accumulated in float32
    np.testing.assert_allclose(b, a, atol=0.05 * np.abs(a).max())


def test_hybrid_model_exports_as_dense_qwen3(tmp_path):
    from transformers import Qwen3ForCausalLM

    from jaxtrace import models
    from jaxtrace.models.hybrid import linearize

    model, hf_dir = tiny_qwen3(tmp_path)
    dense_cfg, _, params = hf_io.load_hf(hf_dir)
    cfg = linearize(dense_cfg, layers=(0,))
    out = hf_io.save_hf(cfg, params, str(tmp_path / "hybrid_export"))
    reloaded = Qwen3ForCausalLM.from_pretrained(out).eval().float()
    ids = np.random.default_rng(3).integers(0, 97, (1, 6))
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(model, ids), atol=1e-6)
    assert models.to_hf_dict(cfg)["model_type"] == "qwen3"
