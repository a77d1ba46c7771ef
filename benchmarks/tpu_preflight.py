"""Ahead-of-time compile of every shipped TPU config for the slice its docstring names, with the
Pallas TPU kernels, on this (CPU) machine; prints one markdown table.

    python benchmarks/tpu_preflight.py                      # every config (an hour on 2 cores)
    python benchmarks/tpu_preflight.py --only qwen3_1p7b_trace --json runs/preflight.json

Each row is one `python -m jaxtrace.compile` run (a subprocess, so one config's compiler memory
is freed before the next); the exact command is printed above the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PALLAS = ["--config.algo.kl_implementation=pallas_tpu"]
MOE = ["--config.model.moe_implementation=pallas_tpu"]
HYBRID = ["--config.model.hybrid_implementation=pallas_tpu"]

# (config, topology its docstring names, extra flags, programs: "" = every program of the run).
# Variants compile the same programs as their base config except where named (the RL step of
# each, and the self-annotation sampler of the online variants), so only those are rerun.
TEACHER, STUDENT = "--programs=rl_step+teacher", "--programs=rl_step"
ONLINE = "--programs=self_annotate_prefill,self_annotate_decode"  # the engine's programs
RUNS = [
    ("qwen3_1p7b_trace", "v5p-8", PALLAS, ""),
    ("qwen3_1p7b_hybrid", "v5p-8", PALLAS + HYBRID, ""),
    ("qwen3_8b_trace", "v5p-64", PALLAS, ""),
    ("qwen3_moe_trace", "v5p-64", PALLAS + MOE, ""),
    ("qwen3_1p7b_trace_rkl", "v5p-8", PALLAS, TEACHER),
    ("qwen3_1p7b_grpo", "v5p-8", PALLAS, STUDENT),
    ("qwen3_1p7b_dapo", "v5p-8", PALLAS, STUDENT),
    ("qwen3_1p7b_opsd", "v5p-8", PALLAS, TEACHER),
    ("qwen3_1p7b_trace_online", "v5p-8", PALLAS, ONLINE),
    ("qwen3_8b_grpo", "v5p-64", PALLAS, STUDENT),
    ("qwen3_8b_dapo", "v5p-64", PALLAS, STUDENT),
    ("qwen3_8b_opsd", "v5p-64", PALLAS, TEACHER),
    ("qwen3_8b_trace_online", "v5p-64", PALLAS, ONLINE),
]


HEADER = (
    "| config | topology | program | verdict | HBM GiB per chip (of) | TFLOP/chip | compile s |\n"
    "|---|---|---|---|---|---|---|"
)


def command(config, topology, extra, json_path):
    return [
        sys.executable, "-m", "jaxtrace.compile", f"--config=configs/{config}.py",
        f"--topology={topology}", *extra, f"--json={json_path}",
    ]  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, help="config names to run (default: all)")
    p.add_argument("--topology", default=None, help="override every run's topology")
    p.add_argument("--json", default="", help="write every run's results here")
    p.add_argument("--programs", default="", help="override every run's --programs (a list)")
    args = p.parse_args()
    runs = [r for r in RUNS if not args.only or r[0] in args.only]
    if args.only and len(runs) != len(args.only):
        p.error(f"--only: unknown config among {args.only}; known: {[r[0] for r in RUNS]}")
    rows, everything = [], []
    for config, topology, extra, programs in runs:
        topology = args.topology or topology
        programs = f"--programs={args.programs}" if args.programs else programs
        extra = extra + ([programs] if programs else [])
        first = len(rows)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "r.json")
            cmd = command(config, topology, extra, out)
            print("$ python", " ".join(cmd[1:]), flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if not os.path.exists(out):
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append(f"| {config} | {topology} | (failed to start) | {err[:120]} | | | |")
                continue
            with open(out) as f:
                result = json.load(f)
        everything.append({"config": config, "topology": topology, "wall_s": wall, **result})
        hbm = result["chip"]["hbm_bytes"] / 2**30
        for prog in result["programs"]:
            if prog["status"] == "ok":
                verdict = "fits" if prog["total_bytes"] <= result["chip"]["hbm_bytes"] else "no"
                mem = f"{prog['total_bytes'] / 2**30:.1f} / {hbm:.1f}"
                flops = f"{prog['flops'] / 1e12:.1f}"
            else:
                verdict, mem, flops = prog["status"], prog["message"][:110], ""
            rows.append(
                f"| {config} | {topology} | {prog['name']} | {verdict} | {mem} | {flops} | "
                f"{prog['compile_s']:.0f} |"
            )
        print(f"  done in {wall:.0f} s", flush=True)
        print("\n".join(["", HEADER, *rows[first:], ""]), flush=True)
        if args.json:  # after every config, so a long batch keeps what it measured
            with open(args.json, "w") as f:
                json.dump(everything, f, indent=2)
    print("all configs:")
    print(HEADER)
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=2)


if __name__ == "__main__":
    main()
