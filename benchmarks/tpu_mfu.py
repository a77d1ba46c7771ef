"""Roofline estimate of the MFU of a config's RL step on a TPU slice, from an ahead-of-time
compile on this (CPU) machine. An estimate, an upper bound, until measured on the hardware.

    python benchmarks/tpu_mfu.py --config configs/qwen3_1p7b_trace.py --topology v5p-8

XLA's cost analysis counts a loop body once, and the step the trainer runs loops (layers under
scan, micro-batches under scan, the chunked span-KL), so this compiles a copy of the step that
does the same arithmetic without the loops the cost analysis cannot see: layers unrolled
(`model.scan_layers=False`), one micro-batch as the whole update (`train.micro_batch_rows=0`,
`rollout.prompts_per_step=--prompts`), dense attention (`model.attention_impl=dense`: XLA counts
its whole [T, S] rectangle, twice the causal work splash does) and the XLA span-KL. Its FLOPs and
bytes per row, times the config's rows, give a roofline time per update:

    t = max(XLA FLOPs / peak, XLA bytes accessed / HBM bandwidth)    (per chip)
    MFU <= model FLOPs / (t * peak)                                   (`jaxtrace.flops`)

Everything the roofline leaves out (collectives, kernel efficiency below peak, host work, the
rollout) only lowers the real figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

UNROLLED = [
    "--config.model.scan_layers=False",
    "--config.model.attention_impl=dense",
    "--config.train.micro_batch_rows=0",
    "--config.algo.kl_implementation=xla",
]


def compile_json(config, topology, flags, programs):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [
            sys.executable, "-m", "jaxtrace.compile", f"--config={config}",
            f"--topology={topology}", f"--programs={programs}", f"--json={out}", *flags,
        ]  # fmt: skip
        print("$ python", " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if not os.path.exists(out):
            raise SystemExit(proc.stderr.strip().splitlines()[-1])
        with open(out) as f:
            return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/qwen3_1p7b_trace.py")
    p.add_argument("--topology", default="v5p-8")
    p.add_argument("--programs", default="rl_step+teacher,rl_step")
    p.add_argument("--prompts", type=int, default=1, help="prompts of the unrolled copy")
    p.add_argument("--real_json", default="", help="a jaxtrace.compile --json of the real step")
    p.add_argument("extra", nargs="*", help="more --config.key=value overrides, after --")
    a = p.parse_args()
    # The real step: its model FLOPs (the whole update) and its rows.
    if a.real_json:
        with open(a.real_json) as f:
            real = json.load(f)
        real["programs"] = [r for r in real["programs"] if r["name"] in a.programs.split(",")]
    else:
        real = compile_json(a.config, a.topology, a.extra, a.programs)
    small = compile_json(
        a.config,
        a.topology,
        [*a.extra, *UNROLLED, f"--config.rollout.prompts_per_step={a.prompts}"],
        a.programs,
    )
    chip = real["chip"]
    print(
        f"\n{a.config} on {a.topology} ({chip['name']}: {chip['peak_flops'] / 1e12:.0f} TFLOP/s, "
        f"{chip['hbm_bandwidth'] / 1e9:.0f} GB/s per chip); unrolled copy at {a.prompts} "
        "prompt(s), scaled by model FLOPs\n"
    )
    print(
        "| program | model TFLOP/chip | XLA TFLOP/chip (est.) | XLA / model | HBM TB/chip (est.) "
        "| roofline s | bound by | MFU estimate (upper bound) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r, s in zip(real["programs"], small["programs"]):
        if s["status"] != "ok" or not s["model_flops"] or not r["model_flops"]:
            print(f"| {r['name']} | unrolled copy: {s['status']} {s.get('message', '')[:80]} |")
            continue
        scale = r["model_flops"] / s["model_flops"]  # rows (and their lengths) of the real step
        flops, hbm = s["flops"] * scale, s["bytes_accessed"] * scale
        compute, memory = flops / chip["peak_flops"], hbm / chip["hbm_bandwidth"]
        t = max(compute, memory)
        print(
            f"| {r['name']} | {r['model_flops'] / 1e12:.0f} | {flops / 1e12:.0f} "
            f"| {flops / r['model_flops']:.2f} | {hbm / 1e12:.1f} | {t:.1f} "
            f"| {'compute' if compute >= memory else 'HBM'} "
            f"| {100 * r['model_flops'] / (t * chip['peak_flops']):.0f}% |"
        )


if __name__ == "__main__":
    main()
