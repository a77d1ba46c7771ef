"""An MFU estimate of the RL step on a TPU slice, from the XLA:TPU compiler's own cost analysis,
on this (CPU) machine; prints a markdown table. An estimate until measured on hardware.

    python benchmarks/tpu_mfu.py                                   # 1.7B TRACE, v5p-8 and v6e-8
    python benchmarks/tpu_mfu.py --config configs/qwen3_1p7b_grpo.py --topology v5p-8

Why not read it off `python -m jaxtrace.compile`: XLA's cost analysis counts a loop body once,
and the shipped step has two loops (the layers under `lax.scan`, the micro-batches), and the
splash kernel is a custom call XLA gives no FLOPs. So this compiles loop-free copies of ONE
micro-batch (`rollout.prompts_per_step=1` gives one group of `num_samples` rows, the shipped
micro-batch; `train.micro_batch_rows=0`; `model.scan_layers=False`; `model.attention_impl=dense`,
which XLA counts; the XLA span-KL) at two depths, L1 and L2 layers, and extrapolates each count
linearly to the config's depth (every layer is the same program, so FLOPs and bytes are linear
in the layer count). The shipped step runs prompts_per_step such micro-batches and one optimizer
update (not counted: ~10 FLOPs a parameter). Then, per chip:

  roofline time  = max(XLA FLOPs / peak FLOP/s, XLA bytes accessed / HBM bandwidth)
  MFU estimate   = model FLOPs / (peak FLOP/s x roofline time)

Model FLOPs (`jaxtrace.flops`) count the useful work: the student's forward and backward with
causal keys, the teacher's forward; no remat recompute. What the estimate leaves out, so it is an
upper bound: collectives (FSDP all-gathers and reduce-scatters; on the chips' ICI they overlap
compute only partly), the per-op roofline (a whole-program max overlaps what an op cannot), and
the optimizer. What makes it pessimistic: the dense copy computes the full T x S score square and
writes fp32 scores to HBM, where the shipped splash kernel skips masked blocks and keeps scores
in VMEM. Both are in the columns: "XLA / model" is the FLOP overhead (remat ~ +1 forward, the
non-causal half of the scores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOP_FREE = [
    "--config.model.scan_layers=False",
    "--config.model.attention_impl=dense",
    "--config.train.micro_batch_rows=0",
    "--config.algo.kl_implementation=xla",
    "--config.rollout.prompts_per_step=1",
]


def compile_one(config, topology, program, layers, extra):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [
            sys.executable, "-m", "jaxtrace.compile", f"--config={config}",
            f"--topology={topology}", f"--programs={program}", *extra, *LOOP_FREE,
            f"--config.model.num_layers={layers}", f"--json={out}",
        ]  # fmt: skip
        print("$ python", " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if not os.path.exists(out):
            sys.exit(f"compile failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        with open(out) as f:
            result = json.load(f)
    (prog,) = result["programs"]
    if prog["status"] != "ok":
        sys.exit(f"{program} at {layers} layers on {topology}: {prog['status']}: {prog['message']}")
    return result, prog


def config_value(config, key, extra):
    """A value of the config file (with its ':variant'), or of an override among `extra`."""
    for flag in extra:
        if flag.startswith(f"--config.{key}="):
            return int(flag.split("=", 1)[1])
    path, _, variant = config.partition(":")
    spec = importlib.util.spec_from_file_location("config_module", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    value = module.get_config(variant or None)
    for part in key.split("."):
        value = value[part]
    return int(value)


def estimate(config, topology, program, l1, l2, extra):
    depth = config_value(config, "model.num_layers", extra)
    groups = config_value(config, "rollout.prompts_per_step", extra)
    (r1, p1), (_, p2) = (compile_one(config, topology, program, n, extra) for n in (l1, l2))

    def at_depth(key):  # one micro-batch at the config's depth, per chip
        per_layer = (p2[key] - p1[key]) / (l2 - l1)
        return p1[key] + per_layer * (depth - l1)

    chip = r1["chip"]
    keys = ("flops", "bytes_accessed", "model_flops")
    xla_flops, xla_bytes, model_flops = (groups * at_depth(k) for k in keys)
    t_flops = xla_flops / chip["peak_flops"]
    t_bytes = xla_bytes / chip["hbm_bandwidth"]
    t_roof = max(t_flops, t_bytes)
    return {
        "config": config, "topology": topology, "program": program, "layers": depth,
        "groups": groups, "xla_tflop": xla_flops / 1e12, "model_tflop": model_flops / 1e12,
        "ratio": xla_flops / model_flops, "t_flops": t_flops, "t_bytes": t_bytes,
        "t_roof": t_roof, "mfu": model_flops / (chip["peak_flops"] * t_roof),
    }  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/qwen3_1p7b_trace.py")
    p.add_argument("--topology", nargs="*", default=["v5p-8", "v6e-8"])
    p.add_argument("--program", default="rl_step+teacher", help="rl_step for the no-teacher algos")
    p.add_argument("--layers", default="2,4", help="the two depths compiled (L1,L2)")
    p.add_argument("--json", default="")
    args, extra = p.parse_known_args()  # the rest: --config.<key>=<value> overrides
    l1, l2 = (int(n) for n in args.layers.split(","))
    if not 0 < l1 < l2:
        p.error(f"--layers: want two depths 0 < L1 < L2, got {args.layers!r}")
    rows = [estimate(args.config, t, args.program, l1, l2, extra) for t in args.topology]
    print(
        "\n| config | topology | program | XLA TFLOP/chip | model TFLOP/chip | XLA / model "
        "| s at peak (XLA FLOPs) | s at HBM BW (XLA bytes) | roofline s | MFU estimate |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {os.path.basename(r['config'])} | {r['topology']} | {r['program']} "
            f"| {r['xla_tflop']:,.0f} | {r['model_tflop']:,.0f} | {r['ratio']:.2f} "
            f"| {r['t_flops']:.1f} | {r['t_bytes']:.1f} | {r['t_roof']:.1f} | {r['mfu']:.0%} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
