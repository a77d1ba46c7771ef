"""The paper's claims in miniature: GRPO vs all-token self-distillation (OPSD) vs TRACE on the
CPU default task (configs/tiny.py), several seeds each, equal RL steps.

For every seed the supervised warm start runs once and is shared by every method (its checkpoint
and tokenizer are copied into each run's workdir, where the trainer finds and reuses them), so the
methods differ only in the RL phase. Each run is `python -m jaxtrace.train` in a subprocess; a run
whose results.json exists is not run again, so an interrupted sweep resumes where it stopped.

    python benchmarks/reproduce.py                          # 3 seeds x 4 methods, then the report
    python benchmarks/reproduce.py --seeds 0 --methods grpo,trace --steps 20   # a quick look
    python benchmarks/reproduce.py --report_only            # redraw from finished runs

Writes into --out (docs/results by default): reproduce.png (held-out accuracy, policy entropy,
response length and cumulative privileged-gradient exposure against RL step; mean over seeds with
a min-max band), reproduce.md (the table) and reproduce.json (every number behind both).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

METHODS = {  # name in the report -> configs/tiny.py variant
    "grpo": "grpo",
    "opsd": "opsd",
    "trace_fkl": "trace",
    "trace_rkl": "trace_rkl",
}
LABELS = {
    "grpo": "GRPO",
    "opsd": "OPSD (all-token FKL)",
    "trace_fkl": "TRACE (FKL key spans)",
    "trace_rkl": "TRACE (RKL error spans)",
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_dir(args, seed, method):
    return os.path.join(args.workdir, f"seed{seed}", method)


def train_one(args, seed, method, sft_from):
    """Runs one method for one seed (skipped when finished); returns its workdir."""
    wd = run_dir(args, seed, method)
    if os.path.exists(os.path.join(wd, "results.json")):
        print(f"[reproduce] seed {seed} {method}: done already ({wd})", flush=True)
        return wd
    os.makedirs(wd, exist_ok=True)
    if sft_from and not os.path.exists(os.path.join(wd, "sft")):
        shutil.copytree(os.path.join(sft_from, "sft"), os.path.join(wd, "sft"))
        shutil.copy(os.path.join(sft_from, "tokenizer.model"), os.path.join(wd, "tokenizer.model"))
    cmd = [
        sys.executable,
        "-m",
        "jaxtrace.train",
        f"--config={args.config}:{METHODS[method]}",
        f"--config.seed={seed}",
        f"--config.workdir={wd}",
        f"--config.train.steps={args.steps}",
        f"--config.train.eval_every={args.eval_every}",
        "--config.train.progress=False",
        *args.extra,
    ]
    print(f"[reproduce] seed {seed} {method}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    with open(os.path.join(wd, "train.log"), "a") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"[reproduce] seed {seed} {method} failed (exit {rc}); see {wd}/train.log")
    print(f"[reproduce] seed {seed} {method}: {time.perf_counter() - t0:.0f} s", flush=True)
    return wd


def load_run(wd):
    """results.json and the per-step series from metrics.jsonl (last write of a step wins, so a
    resumed run's repeated steps count once)."""
    with open(os.path.join(wd, "results.json")) as f:
        results = json.load(f)
    series = {}
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            step = row.pop("step")
            for k, v in row.items():
                series.setdefault(k, {})[step] = v
    return results, {k: sorted(v.items()) for k, v in series.items()}


def held_out_curve(results, series):
    """(steps, accuracy): step 0 is the warm start, then every periodic eval and the final one."""
    pts = {0: results["before"]["pass@1"]}
    pts.update(dict(series.get("eval/pass@1", [])))
    return sorted(pts.items())


def _stack(curves):
    """Curves on their common steps -> (steps, [runs, steps] array)."""
    common = sorted(set.intersection(*[{s for s, _ in c} for c in curves]))
    return np.array(common), np.array([[dict(c)[s] for s in common] for c in curves])


def collect(args):
    data = {}
    for method in args.methods:
        runs = []
        for seed in args.seeds:
            wd = run_dir(args, seed, method)
            if not os.path.exists(os.path.join(wd, "results.json")):
                continue
            results, series = load_run(wd)
            runs.append(
                {
                    "seed": seed,
                    "before": results["before"]["pass@1"],
                    "after": results["after"]["pass@1"],
                    "step_time_s": results["step_time_s"],
                    "cum_exposure": results["cum_exposure"],
                    "curves": {
                        "heldout_accuracy": held_out_curve(results, series),
                        "entropy": series.get("train/entropy", []),
                        "response_len": series.get("train/response_length", []),
                        "cum_exposure": series.get("train/cum_exposure", []),
                        "train_accuracy": series.get("train/accuracy", []),
                    },
                }
            )
        if runs:
            data[method] = runs
    return data


def _mean_over(curve, lo, hi):
    vals = [v for s, v in curve if lo <= s <= hi]
    return float(np.mean(vals)) if vals else float("nan")


def table(data, steps):
    """Markdown table: held-out accuracy before/after (mean +- std over seeds, per seed), entropy
    and length early (first quarter of RL) and late (last quarter), final exposure."""
    q = max(1, steps // 4)
    head = (
        "| method | seeds | held-out before | held-out after | gain | after, per seed "
        f"| entropy steps 1-{q} | entropy steps {steps - q + 1}-{steps} "
        f"| length steps 1-{q} | length steps {steps - q + 1}-{steps} "
        "| cum. exposure | step s (median) |"
    )
    lines = [head, "|" + "---|" * 12]
    rows = {}
    for method, runs in data.items():
        before = np.array([r["before"] for r in runs])
        after = np.array([r["after"] for r in runs])
        ent_early = [_mean_over(r["curves"]["entropy"], 1, q) for r in runs]
        ent_late = [_mean_over(r["curves"]["entropy"], steps - q + 1, steps) for r in runs]
        len_early = [_mean_over(r["curves"]["response_len"], 1, q) for r in runs]
        len_late = [_mean_over(r["curves"]["response_len"], steps - q + 1, steps) for r in runs]
        row = {
            "seeds": [r["seed"] for r in runs],
            "before_mean": float(before.mean()),
            "after_mean": float(after.mean()),
            "after_std": float(after.std(ddof=1)) if len(runs) > 1 else 0.0,
            "gain_mean": float((after - before).mean()),
            "gain_min": float((after - before).min()),
            "after_per_seed": after.tolist(),
            "entropy_early": float(np.mean(ent_early)),
            "entropy_late": float(np.mean(ent_late)),
            "length_early": float(np.mean(len_early)),
            "length_late": float(np.mean(len_late)),
            "cum_exposure": float(np.mean([r["cum_exposure"] for r in runs])),
            "step_time_s": float(np.median([r["step_time_s"] for r in runs])),
        }
        rows[method] = row
        lines.append(
            f"| {LABELS[method]} | {len(runs)} | {100 * row['before_mean']:.1f}% "
            f"| {100 * row['after_mean']:.1f}% ± {100 * row['after_std']:.1f} "
            f"| {100 * row['gain_mean']:+.1f} pts (min {100 * row['gain_min']:+.1f}) "
            f"| {', '.join(f'{100 * a:.1f}' for a in after)} "
            f"| {row['entropy_early']:.3f} | {row['entropy_late']:.3f} "
            f"| {row['length_early']:.1f} | {row['length_late']:.1f} "
            f"| {row['cum_exposure']:,.0f} | {row['step_time_s']:.2f} |"
        )
    return "\n".join(lines), rows


def plot(data, path):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = [
        ("heldout_accuracy", "held-out accuracy (greedy)"),
        ("entropy", "policy entropy (nats/token)"),
        ("response_len", "response length (tokens)"),
        ("cum_exposure", "cumulative privileged-gradient exposure"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    axes = axes.ravel()
    for ax, (key, title) in zip(axes, panels):
        for method, runs in data.items():
            curves = [r["curves"][key] for r in runs if r["curves"][key]]
            if not curves:
                continue
            steps, y = _stack(curves)
            (line,) = ax.plot(steps, y.mean(0), label=f"{LABELS[method]} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(steps, y.min(0), y.max(0), alpha=0.2, color=line.get_color())
        if key == "cum_exposure":  # OPSD's all-token exposure dwarfs TRACE's span exposure
            ax.set_yscale("symlog", linthresh=1000)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/tiny.py")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--methods", default=",".join(METHODS), help=f"from {list(METHODS)}")
    p.add_argument("--steps", type=int, default=80, help="RL steps, equal for every method")
    p.add_argument("--eval_every", type=int, default=20, help="held-out eval period (RL steps)")
    p.add_argument("--workdir", default="runs/reproduce")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--report_only", action="store_true", help="only redraw from finished runs")
    p.add_argument("extra", nargs="*", help="more --config.key=value overrides, after --")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.methods = args.methods.split(",")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")

    if not args.report_only:
        for seed in args.seeds:
            sft_from = None
            for method in args.methods:
                wd = train_one(args, seed, method, sft_from)
                sft_from = sft_from or wd

    data = collect(args)
    if not data:
        raise SystemExit(f"[reproduce] no finished runs under {args.workdir}")
    os.makedirs(args.out, exist_ok=True)
    md, rows = table(data, args.steps)
    plot(data, os.path.join(args.out, "reproduce.png"))
    with open(os.path.join(args.out, "reproduce.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "reproduce.json"), "w") as f:
        json.dump({"args": vars(args), "summary": rows, "runs": data}, f, indent=1)
    print(md)
    print(f"[reproduce] wrote {args.out}/reproduce.png, reproduce.md, reproduce.json")


if __name__ == "__main__":
    main()
