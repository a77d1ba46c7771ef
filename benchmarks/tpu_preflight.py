"""Ahead-of-time compile of every shipped TPU config for the slices its docstring names, with the
Pallas TPU kernels, on this (CPU) machine; prints markdown tables.

    python benchmarks/tpu_preflight.py                      # every config (hours on 2 cores)
    python benchmarks/tpu_preflight.py --only qwen3_1p7b_trace --json runs/preflight.json
    python benchmarks/tpu_preflight.py --only qwen3_1p7b_trace --topology v6e-8 \
        --lengths 8192,16384,32768                          # the longest response that fits

Each row is one `python -m jaxtrace.compile` run (a subprocess, so one config's compiler memory
is freed before the next); the exact command is printed above the table. With --lengths, each
(config, slice) is compiled at each response length (`rollout.max_new_tokens`) in turn, up to
the first that does not fit, and a last table gives the longest that fits.
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

# (config, slices its docstring names, extra flags, programs: "" = every program of the run).
# Variants compile the same programs as their base config except where named (the RL step of
# each, and the self-annotation sampler of the online variants), so only those are rerun.
TEACHER, STUDENT = "--programs=rl_step+teacher", "--programs=rl_step"
ONLINE = "--programs=self_annotate_prefill,self_annotate_decode"  # the engine's programs
V5P_8, V5P_64 = ("v5p-8", "v6e-8"), ("v5p-64", "v6e-64")
RUNS = [
    ("qwen3_1p7b_trace", V5P_8, PALLAS, ""),
    ("qwen3_1p7b_hybrid", ("v5p-8",), PALLAS + HYBRID, ""),
    ("qwen3_8b_trace", V5P_64, PALLAS, ""),
    ("qwen3_moe_trace", ("v5p-64",), PALLAS + MOE, ""),
    ("qwen3_1p7b_trace_rkl", V5P_8, PALLAS, TEACHER),
    ("qwen3_1p7b_grpo", V5P_8, PALLAS, STUDENT),
    ("qwen3_1p7b_dapo", V5P_8, PALLAS, STUDENT),
    ("qwen3_1p7b_opsd", V5P_8, PALLAS, TEACHER),
    ("qwen3_1p7b_trace_online", V5P_8, PALLAS, ONLINE),
    ("qwen3_8b_trace:trace_rkl", V5P_64, PALLAS, TEACHER),
    ("qwen3_8b_grpo", V5P_64, PALLAS, STUDENT),
    ("qwen3_8b_dapo", V5P_64, PALLAS, STUDENT),
    ("qwen3_8b_opsd", V5P_64, PALLAS, TEACHER),
    ("qwen3_8b_trace_online", V5P_64, PALLAS, ONLINE),
]


HEADER = (
    "| config | topology | N | program | verdict | HBM GiB per chip (of) | XLA TFLOP/chip "
    "| model TFLOP/chip | compile s |\n|---|---|---|---|---|---|---|---|---|"
)


def command(config, topology, extra, json_path):
    name, sep, variant = config.partition(":")  # a variant of a config file: name:variant
    return [
        sys.executable, "-m", "jaxtrace.compile", f"--config=configs/{name}.py{sep}{variant}",
        f"--topology={topology}", *extra, f"--json={json_path}",
    ]  # fmt: skip


def compile_run(config, topology, extra):
    """One `jaxtrace.compile` subprocess: its JSON result (None if it did not start) and the
    last line of its stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = command(config, topology, extra, out)
        print("$ python", " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
        if not os.path.exists(out):
            return None, (proc.stderr.strip().splitlines() or ["no output"])[-1]
        with open(out) as f:
            return json.load(f), ""


def fits(prog, chip) -> bool:
    return prog["status"] == "ok" and prog["total_bytes"] <= chip["hbm_bytes"]


def table_rows(config, topology, length, result):
    hbm = result["chip"]["hbm_bytes"] / 2**30
    rows = []
    for prog in result["programs"]:
        model = ""
        if prog["status"] == "ok":
            verdict = "fits" if fits(prog, result["chip"]) else "no"
            mem = f"{prog['total_bytes'] / 2**30:.1f} / {hbm:.1f}"
            flops = f"{prog['flops'] / 1e12:.1f}"
            if prog.get("model_flops"):
                model = f"{prog['model_flops'] / 1e12:.0f}"
        else:
            verdict, mem, flops = prog["status"], prog["message"][:110], ""
        rows.append(
            f"| {config} | {topology} | {length} | {prog['name']} | {verdict} | {mem} | {flops} "
            f"| {model} | {prog['compile_s']:.0f} |"
        )
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, help="config names to run (default: all)")
    p.add_argument("--topology", default=None, help="override every run's slices (one slice)")
    p.add_argument("--json", default="", help="write every run's results here")
    p.add_argument("--programs", default="", help="override every run's --programs (a list)")
    p.add_argument(
        "--lengths",
        default="",
        help="response lengths to try in turn (e.g. 2048,4096,8192,16384,32768), up to the "
        "first that does not fit; default: the config's own",
    )
    args = p.parse_args()
    runs = [r for r in RUNS if not args.only or r[0] in args.only]
    if args.only and len(runs) != len(args.only):
        p.error(f"--only: unknown config among {args.only}; known: {[r[0] for r in RUNS]}")
    lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else [None]
    rows, everything, longest = [], [], []
    for config, topologies, extra, programs in runs:
        programs = f"--programs={args.programs}" if args.programs else programs
        for topology in [args.topology] if args.topology else topologies:
            best = None
            for length in lengths:
                flags = extra + ([programs] if programs else [])
                if length:
                    flags = [*flags, f"--config.rollout.max_new_tokens={length}"]
                first = len(rows)
                result, err = compile_run(config, topology, flags)
                shown = length or "config"
                if result is None:
                    rows.append(
                        f"| {config} | {topology} | {shown} | (failed to start) | {err[:120]} |||||"
                    )
                    print(rows[-1], flush=True)
                    break
                everything.append(
                    {"config": config, "topology": topology, "length": length, **result}
                )
                rows += table_rows(config, topology, shown, result)
                print("\n".join(["", HEADER, *rows[first:], ""]), flush=True)
                if args.json:  # after every compile, so a long batch keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump(everything, f, indent=2)
                if not all(fits(prog, result["chip"]) for prog in result["programs"]):
                    break
                best = length
            if args.lengths:
                longest.append(f"| {config} | {topology} | {best or f'< {lengths[0]}'} |")
    print("all configs:")
    print(HEADER)
    print("\n".join(rows))
    if args.lengths:
        print("\nlongest response that fits (every program):")
        print("| config | topology | max_new_tokens |\n|---|---|---|")
        print("\n".join(longest))


if __name__ == "__main__":
    main()
