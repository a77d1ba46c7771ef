"""PPO mini-batches: 1 vs 4 optimizer updates per rollout batch on the CPU default task.

For each seed the supervised warm start runs once and is shared by both settings (its
checkpoint and tokenizer are copied into each run's workdir), so the runs differ only in
`algo.num_minibatches`. Each run is `python -m jaxtrace.train` in a subprocess; a finished run
(results.json present) is not run again. Prints one table: held-out accuracy (greedy pass@1)
before and after RL, per seed and averaged, the median RL step time, and the mean clip fraction
and approximate KL to the behaviour policy over the run (what the extra updates change).

    python benchmarks/minibatch.py                                  # 3 seeds x {1, 4}, :grpo
    python benchmarks/minibatch.py --seeds 0 --steps 30             # a short look
    python benchmarks/minibatch.py --variant trace --minibatches 1,2,4
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(args, seed, minibatches, sft_from):
    wd = os.path.join(args.workdir, f"seed{seed}", f"mb{minibatches}")
    if os.path.exists(os.path.join(wd, "results.json")):
        return wd, None
    os.makedirs(wd, exist_ok=True)
    if sft_from and not os.path.exists(os.path.join(wd, "sft")):
        shutil.copytree(os.path.join(sft_from, "sft"), os.path.join(wd, "sft"))
        shutil.copy(os.path.join(sft_from, "tokenizer.model"), os.path.join(wd, "tokenizer.model"))
    cmd = [
        sys.executable,
        "-m",
        "jaxtrace.train",
        f"--config={args.config}:{args.variant}",
        f"--config.seed={seed}",
        f"--config.workdir={wd}",
        f"--config.train.steps={args.steps}",
        f"--config.algo.num_minibatches={minibatches}",
        "--config.train.progress=False",
        *args.extra,
    ]
    print(f"[minibatch] seed {seed}, {minibatches} mini-batches: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    with open(os.path.join(wd, "train.log"), "a") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"[minibatch] run failed (exit {rc}); see {wd}/train.log")
    return wd, time.perf_counter() - t0


def summary(wd):
    with open(os.path.join(wd, "results.json")) as f:
        res = json.load(f)
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    train = [r for r in rows if "train/loss" in r]
    mean = lambda k: float(np.mean([r[k] for r in train if k in r])) if train else float("nan")
    return {
        "before": res["before"]["pass@1"],
        "after": res["after"]["pass@1"],
        "step_s": res["step_time_s"],
        "clip_frac": mean("train/clip_frac"),
        "approx_kl": mean("train/approx_kl"),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/tiny.py")
    p.add_argument("--variant", default="grpo")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--minibatches", default="1,4")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--workdir", default="runs/bench_minibatch")
    p.add_argument("extra", nargs="*", help="more --config.key=value overrides, after --")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [int(m) for m in args.minibatches.split(",")]
    table = {m: [] for m in settings}
    for seed in seeds:
        first = None
        for m in settings:
            wd, _ = train(args, seed, m, first)
            first = first or wd  # later settings reuse this run's warm start and tokenizer
            table[m].append(summary(wd))
    head = "| mini-batches | seeds | held-out before | held-out after (mean) | after, per seed "
    head += "| step s (median of medians) | clip frac (mean) | approx KL (mean) |"
    print(head)
    print("|---|---|---|---|---|---|---|---|")
    for m, runs in table.items():
        pct = lambda k, runs=runs: 100 * float(np.mean([r[k] for r in runs]))
        per_seed = ", ".join(f"{100 * r['after']:.1f}" for r in runs)
        print(
            f"| {m} | {len(runs)} | {pct('before'):.1f}% | {pct('after'):.1f}% | {per_seed} "
            f"| {np.median([r['step_s'] for r in runs]):.2f} "
            f"| {np.mean([r['clip_frac'] for r in runs]):.4f} "
            f"| {np.mean([r['approx_kl'] for r in runs]):.2e} |"
        )


if __name__ == "__main__":
    main()
