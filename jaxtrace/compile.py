"""Compile every program a run executes for a TPU slice, ahead of time, from any machine:

    python -m jaxtrace.compile --config=configs/qwen3_1p7b_trace.py --topology=v5p-8
    python -m jaxtrace.compile --config=configs/qwen3_8b_trace.py:grpo --topology=v6e-64 \\
        --config.rollout.prompts_per_step=16 --programs=rl_step,sampler_decode

The config and its `--config.<key>=<value>` overrides are the ones `jaxtrace.train` takes; the
mesh comes from the config exactly as on the slice. Each program (SFT step, RL step with and
without the teacher, the once-per-rollout-batch log-prob and teacher passes of PPO mini-batches
and the reference KL, divergence pass, the reshard of the weights to the decode layout, and the
rollout, eval and self-annotation samplers on that copy, with the training state counted beside
them and the rows the cache budget allows: the continuous engine's prefill and its largest
decode segment, or one row chunk of the static sampler) is
built by the trainer's own constructors at the config's shapes from abstract params (nothing is
allocated) and compiled by XLA:TPU and Mosaic for the slice's chips (libtpu describes the
topology; no TPU is needed). One table: compiled or the first error line, per-chip HBM
(arguments, temporaries, resident beside the program, total) against the chip's, XLA's FLOPs
per chip, and for the training programs the model FLOPs per chip (`jaxtrace.flops`) and the time
they take at the chip's peak (the step time at 100% MFU, published chip figures), and compile
seconds. XLA's cost analysis counts a loop body once - the layers under scan, the micro-batches -
so its FLOPs are per body, not per step (a roofline estimate of MFU needs a loop-free copy of
the step: `--config.model.scan_layers=False --config.train.micro_batch_rows=0` at a small batch).

Exit codes: 0 every program compiled and fits; 1 some program failed to compile or does not
fit; 2 bad flags, config or topology, or libtpu missing.
"""

from __future__ import annotations

import json
import os
import sys

# Compiling for a TPU needs libtpu, not a TPU: jax itself stays on the CPU (set before the config
# file, which imports jax, is loaded), and libtpu is told what it describes (else it warns that
# this host is no TPU VM) and that no chip is opened, so several compiles may run at once.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from types import SimpleNamespace  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxtrace import cli  # noqa: E402

_F = SimpleNamespace()  # the flags, once define_flags() has run (only when run as a program)


def define_flags() -> None:
    _F.config = config_flags.DEFINE_config_file(
        "config",
        None,
        "Path to a config file (configs/*.py[:variant]), as for jaxtrace.train.",
        lock_config=True,
    )
    _F.topology = flags.DEFINE_string(
        "topology",
        None,
        "TPU slice to compile for, as Google Cloud names it: v4-8, v5e-8 (= v5litepod-8), "
        "v5p-8, v5p-64, v6e-8, v6e-64, ... (v4/v5p count TensorCores, v5e/v6e chips); or a "
        "libtpu topology such as v5p:4x4x12.",
    )
    _F.programs = flags.DEFINE_list(
        "programs",
        [],
        "Only these programs (default: every program the run executes): sft_step, rl_step, "
        "rl_step+teacher, logprobs and teacher_hidden (PPO mini-batches / reference KL), "
        "divergence, decode_reshard (rollout.decode_layout != train, or a dtype cast); the "
        "samplers sampler, eval_sampler, self_annotate (static engine) or "
        "their _prefill and _decode (continuous engine: its prefill and largest segment).",
    )
    _F.json = flags.DEFINE_string("json", "", "Also write the results as JSON to this path.")
    flags.mark_flags_as_required(["config", "topology"])


GiB = 2**30


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def table(results, chip) -> str:
    from jaxtrace.metrics import table as fmt  # noqa: PLC0415

    rows = []
    for r in results:
        row = {"program": r.name, "verdict": r.status if r.status != "error" else "error"}
        if r.status == "ok":
            fits = r.total_bytes <= chip.hbm_bytes
            row["verdict"] = "fits" if fits else "does not fit"
            row.update(
                {
                    "args GiB": _gib(r.argument_bytes),
                    "temp GiB": _gib(r.temp_bytes),
                    "resident GiB": _gib(r.resident_bytes),
                    "total GiB": f"{_gib(r.total_bytes)} / {_gib(chip.hbm_bytes)}",
                    "XLA TFLOP": f"{r.flops / 1e12:.2f}",
                }
            )
            if r.model_flops:
                row["model TFLOP"] = f"{r.model_flops / 1e12:.1f}"
                row["s at peak"] = f"{r.model_flops / chip.peak_flops:.1f}"
        else:
            row["total GiB"] = r.message
        row["compile s"] = f"{r.compile_s:.1f}"
        rows.append(row)
    cols = ["program", "verdict", "args GiB", "temp GiB", "resident GiB", "total GiB"]
    return fmt(rows, cols + ["XLA TFLOP", "model TFLOP", "s at peak", "compile s"])


def main(argv):
    del argv
    from jaxtrace import tpu_topology  # noqa: PLC0415

    try:
        topo = tpu_topology.parse(_F.topology.value)
    except tpu_topology.TopologyError as e:
        cli.fail(f"--topology: {e}")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", _F.topology.value)
    import jax  # noqa: PLC0415

    jax.config.update("jax_threefry_partitionable", True)
    from jaxtrace import aot, sharding  # noqa: PLC0415
    from jaxtrace.config import validate  # noqa: PLC0415

    config = aot.with_placeholders(_F.config.value)
    try:
        validate(config)
        devices = tpu_topology.devices(topo)
        mesh = sharding.make_mesh(dict(config.mesh), devices)
        chip = tpu_topology.chip(topo)
        programs = aot.programs(config, mesh)
    except (RuntimeError, ValueError) as e:  # libtpu missing; ConfigError; a mesh that cannot be
        cli.fail(str(e))
    if _F.programs.value:
        known = {p.name for p in programs}
        unknown = [n for n in _F.programs.value if n not in known]
        if unknown:
            cli.fail(
                f"--programs: {unknown[0]!r} is not a program of this run; it runs {sorted(known)}"
            )
        programs = [p for p in programs if p.name in _F.programs.value]
    print(
        f"{topo.name}: {topo.num_devices} x TPU {chip.name} ({topo.libtpu_name}, "
        f"{topo.num_hosts} host{'s' * (topo.num_hosts > 1)}), {_gib(chip.hbm_bytes)} GiB HBM, "
        f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bandwidth / 1e9:.0f} GB/s per "
        f"chip; mesh {dict(mesh.shape)}",
        flush=True,
    )
    results = []
    for prog in programs:
        print(f"compiling {prog.name} ({prog.what}) ...", flush=True)
        results.append(aot.compile_program(prog, mesh))
    print(table(results, chip))
    ok = all(r.status == "ok" and r.total_bytes <= chip.hbm_bytes for r in results)
    if _F.json.value:
        rows = [dict(vars(r), total_bytes=r.total_bytes) for r in results]
        payload = {"topology": topo.name, "mesh": dict(mesh.shape), "chip": vars(chip)}
        with open(_F.json.value, "w") as f:
            json.dump({**payload, "programs": rows, "ok": ok}, f, indent=2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
