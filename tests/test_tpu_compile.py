"""Ahead-of-time compilation for real TPU chips (libtpu's XLA:TPU and Mosaic, no TPU needed).

Fails if a Pallas op cannot be partitioned on a multi-chip mesh (it must run under shard_map),
overflows a chip's VMEM (tiles must be chosen per chip), or the trainer's programs do not compile.
Kept in one file: pytest-xdist (--dist loadfile) then runs them in one worker process.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="libtpu not installed (make test installs it)")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # AOT only: no chip is opened
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxtrace import aot, sharding, tpu_topology  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def v5e4():
    return tpu_topology.devices(tpu_topology.parse("v5e-4"))


@pytest.fixture(scope="module")
def v4_1():
    return tpu_topology.devices(tpu_topology.parse("v4-2"))


# ------------------------------------------------------------------- topology names
@pytest.mark.parametrize(
    "name, libtpu, devices, hosts",
    [
        ("v4-8", "v4:2x2x1", 4, 1),
        ("v5p-8", "v5p:2x2x1", 4, 1),
        ("v5p-64", "v5p:2x4x4", 32, 8),
        ("v5p-128", "v5p:4x4x4", 64, 16),
        ("v5e-8", "v5e:2x4", 8, 1),
        ("v5litepod-16", "v5e:4x4", 16, 4),
        ("v6e-8", "v6e:2x4", 8, 1),
        ("v6e-64", "v6e:8x8", 64, 16),
        ("v5p:4x4x12", "v5p:4x4x12", 192, 48),
    ],
)
def test_topology_names(name, libtpu, devices, hosts):
    topo = tpu_topology.parse(name)
    assert (topo.libtpu_name, topo.num_devices, topo.num_hosts) == (libtpu, devices, hosts)


@pytest.mark.parametrize("bad", ["v5p-7", "v9-8", "tpu-8", "v5e-12", "v5p:2x2"])
def test_bad_topology_names(bad):
    with pytest.raises(tpu_topology.TopologyError, match="topology"):
        tpu_topology.parse(bad)


def test_chip_figures_are_per_device():
    v5p, v5e = (tpu_topology.chip(tpu_topology.parse(n)) for n in ("v5p-8", "v5e-8"))
    assert 95 < v5p.hbm_bytes / 2**30 < 97  # both TensorCores of the megacore chip
    assert 15 < v5e.hbm_bytes / 2**30 < 17
    assert v5p.vmem_bytes == 64 << 20 and v5e.vmem_bytes == 128 << 20


def test_a_tpu_mesh_makes_every_default_choose_for_tpu(v5e4, v4_1):
    """Under a TPU topology's mesh on this CPU host, every per-platform default picks what the
    slice runs: an ahead-of-time compile must compile that, not the host's CPU variants. (jax
    keeps the platform and chip on `AbstractMesh.abstract_device`; reading them off the mesh
    itself found nothing, so the AOT tool compiled chunked attention, XLA span_kl, the CPU decode
    layout and tiles for the smallest VMEM.)"""
    from jaxtrace.models import attention, qwen3
    from pallas_kernels import _mesh, span_kl

    gmm = importlib.import_module("pallas_kernels.moe_dispatch.gmm")  # the name is the function's

    cpu_defaults = (_mesh.target_platform(), qwen3.unstacked_decode())
    assert cpu_defaults == ("cpu", True)
    for devices, vmem in ((v5e4, 128 << 20), (v4_1, 16 << 20)):
        with jax.set_mesh(Mesh(np.asarray(devices).reshape(len(devices)), ("data",))):
            assert _mesh.target_platform() == "tpu"
            assert _mesh.vmem_bytes() == vmem  # the target chip's, not the fallback
            assert attention.default_implementation(1024, 1024) == "splash"
            assert span_kl.default_implementation() == "pallas_tpu"
            assert gmm._resolve("xla") == "xla_ragged"  # not the CPU's blocked loop
            assert not qwen3.unstacked_decode()  # decode runs the layer scan, as on the slice


# ------------------------------------------------------------------- ops alone, one chip
def _compile(fn, args, devices, axes=("data",)):
    mesh = Mesh(np.asarray(devices).reshape(len(devices)), axes)
    with jax.set_mesh(mesh):
        return jax.jit(fn).lower(*args).compile()


def _sds(shape, dtype, devices, spec=None):
    mesh = Mesh(np.asarray(devices).reshape(len(devices)), ("data",))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec or P()))


@pytest.mark.parametrize("chip", ["v4_1", "v5e4"])
def test_span_kl_fits_vmem(chip, request):
    """T=1000 (not a block multiple), D=1024, V=32,001 (odd), float32: forward + backward."""
    from pallas_kernels import span_kl

    devices = request.getfixturevalue(chip)[:1]
    t, d, v = 1000, 1024, 32001

    def loss(h, w, ht, route):
        kl = span_kl.span_kl(h, w, route, h_teacher_TxD=ht, implementation="pallas_tpu")
        return jnp.sum(kl)

    args = [_sds(s, dt, devices) for s, dt in [((t, d), jnp.float32), ((d, v), jnp.float32)]]
    args += [_sds((t, d), jnp.float32, devices), _sds((t,), jnp.int32, devices)]
    compiled = _compile(jax.grad(loss, argnums=(0, 1)), args, devices)
    assert compiled.memory_analysis() is not None


def test_span_kl_blocks_too_big_for_v4_are_refused(v4_1):
    """The issue's v4 failure (blocks of 256 x 512 at D=2048 overflow 16 MiB of VMEM) is now a
    clear error before Mosaic, and unset blocks are chosen smaller for v4."""
    from pallas_kernels import span_kl
    from pallas_kernels.span_kl import kernel_tpu

    devices = v4_1[:1]
    t, d, v = 512, 2048, 1000

    def loss(h, w, route, blocks):
        kl = span_kl.span_kl(h, w, route, h_teacher_TxD=h, implementation="pallas_tpu", **blocks)
        return jnp.sum(kl)

    args = [_sds((t, d), jnp.bfloat16, devices), _sds((d, v), jnp.bfloat16, devices)]
    args += [_sds((t,), jnp.int32, devices)]
    with pytest.raises(ValueError, match="VMEM"):
        _compile(lambda *a: loss(*a, {"block_t": 256, "block_v": 512}), args, devices)
    assert kernel_tpu.choose_blocks(d, 2, 16 << 20) < (256, 512)
    _compile(jax.grad(lambda *a: loss(*a, {})), args, devices)


def test_span_kl_partitions_over_chips(v5e4):
    """The op on 4 chips with tokens split over them: Mosaic needs shard_map for this."""
    from pallas_kernels import span_kl

    t, d, v = 4 * 250, 256, 1000

    def loss(h, w, ht, route):
        return jnp.sum(span_kl.span_kl(h, w, route, h_teacher_TxD=ht, implementation="pallas_tpu"))

    rows = P("data", None)
    args = [_sds((t, d), jnp.bfloat16, v5e4, rows), _sds((d, v), jnp.bfloat16, v5e4)]
    args += [_sds((t, d), jnp.bfloat16, v5e4, rows), _sds((t,), jnp.int32, v5e4, P("data"))]
    _compile(jax.grad(loss, argnums=(0, 1)), args, v5e4)


def test_moe_gmm_and_hybrid_attention_partition(v5e4):
    from pallas_kernels import moe_dispatch
    from pallas_kernels.linear_attention import hybrid_attention

    t, d, f, e = 4 * 100, 256, 384, 8

    def moe_loss(x, logits, wg, wu, wd):
        y, _ = moe_dispatch.moe_ffn(x, logits, wg, wu, wd, top_k=2, implementation="pallas_tpu")
        return jnp.sum(y.astype(jnp.float32))

    bf = jnp.bfloat16
    args = [_sds((t, d), bf, v5e4, P("data", None)), _sds((t, e), bf, v5e4, P("data", None))]
    args += [_sds((e, d, f), bf, v5e4), _sds((e, d, f), bf, v5e4), _sds((e, f, d), bf, v5e4)]
    _compile(jax.grad(moe_loss, argnums=(0, 2, 3, 4)), args, v5e4)

    b, s, h, k, hd = 4, 100, 4, 2, 128

    def attn_loss(q, kk, vv):
        o = hybrid_attention(q, kk, vv, window=32, implementation="pallas_tpu")
        return jnp.sum(o.astype(jnp.float32))

    spec = P("data", None, None, None)
    args = [_sds((b, s, h, hd), bf, v5e4, spec)]
    args += [_sds((b, s, k, hd), bf, v5e4, spec), _sds((b, s, k, hd), bf, v5e4, spec)]
    _compile(jax.grad(attn_loss, argnums=(0, 1, 2)), args, v5e4)


# ------------------------------------------------------------------- whole RL steps
def _load_config(path):
    spec = importlib.util.spec_from_file_location("aot_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _tiny(config_file, devices, **model):
    c = _load_config(config_file)
    c.model.update(num_layers=2, **model)
    for key in ("hybrid_layers", "mlp_only_layers"):  # keep the layer lists inside 2 layers
        c.model[key] = tuple(i for i in c.model[key] if i < 2)
    c.algo.kl_implementation = "pallas_tpu"
    c.rollout.update(prompts_per_step=4, group_size=4)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return aot.with_placeholders(c), sharding.make_mesh(dict(c.mesh), devices)


MODELS = {
    "qwen3": ("configs/tiny.py", {}),
    "moe": ("configs/moe_tiny.py", {"moe_implementation": "pallas_tpu"}),
    "hybrid": ("configs/hybrid_tiny.py", {"hybrid_implementation": "pallas_tpu"}),
}


# The dense model on v5e-4 is test_compile_cli_prints_the_table's.
@pytest.mark.parametrize(
    "family, chips", [("moe", "v5e4"), ("hybrid", "v5e4"), ("qwen3", "v4_1"), ("moe", "v4_1"),
                      ("hybrid", "v4_1")],
)  # fmt: skip
def test_rl_step_compiles_with_pallas_kernels(family, chips, request):
    config_file, model = MODELS[family]
    devices = request.getfixturevalue(chips)
    if chips == "v4_1":
        devices = devices[:1]
    config, mesh = _tiny(config_file, devices, **model)
    progs = {p.name: p for p in aot.programs(config, mesh)}
    result = aot.compile_program(progs["rl_step+teacher"], mesh)
    assert result.status == "ok", result.message
    assert 0 < result.total_bytes < 2**30 and result.flops > 0


def test_compile_cli_prints_the_table():
    """The README's tiny preflight command, exactly as README.md writes it."""
    readme = open(os.path.join(ROOT, "README.md")).read().splitlines()
    (line,) = [
        ln for ln in readme if ln.startswith("python -m jaxtrace.compile --config=configs/tiny")
    ]
    cmd = [sys.executable] + shlex.split(line)[1:]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "v5e-4: 4 x TPU v5e" in out.stdout
    rows = ("sft_step", "rl_step+teacher", "rl_step", "sampler_prefill", "sampler_decode")
    for row in rows + ("eval_sampler_prefill", "eval_sampler_decode"):
        assert any(ln.split()[:2] == [row, "fits"] for ln in out.stdout.splitlines()), out.stdout


def test_compile_cli_bad_input_exits_2():
    base = [sys.executable, "-m", "jaxtrace.compile", "--config=configs/tiny.py"]
    for extra, needle in [
        (["--topology=v5p-7"], "--topology"),
        (["--topology=v5e-4", "--programs=sampler"], "--programs"),  # the engine's are _prefill...
        (["--topology=v5e-4", "--config.rollout.group_size=1"], "group_size"),
    ]:
        out = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and needle in out.stderr, (extra, out.stderr[-1000:])
    help_ = subprocess.run(base[:3] + ["--help"], cwd=ROOT, capture_output=True, text=True)
    assert help_.returncode == 0 and "--topology" in help_.stdout


def test_missing_libtpu_is_one_clear_line(tmp_path):
    (tmp_path / "libtpu.py").write_text("raise ImportError('no libtpu here')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    cmd = [sys.executable, "-m", "jaxtrace.compile", "--config=configs/tiny.py", "--topology=v5p-8"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: libtpu is not installed")
