"""Compile time of a run's programs with the decoder layers unrolled vs under `jax.lax.scan`.

The programs are the trainer's own (`aot.programs`: RL step with the teacher, rollout engine
prefill / decode segment, ...) for `configs/qwen3_1p7b_trace.py` (bf16, remat) cut to a tiny
width (d=64) but the real depth (28 layers) and tiny shapes, so what is timed is mostly the
per-layer program size, which is what the scan removes. Lowered and compiled on the local CPU.
Prints one table: trace + lower seconds, XLA compile seconds and the compiled HLO's line count.

    python benchmarks/compile_scan.py                         # 28 layers, RL step + sampler
    python benchmarks/compile_scan.py --layers 56 --programs rl_step+teacher
    python benchmarks/compile_scan.py --decode --layers 8    # + static sampler decode time

`--decode` also times the static sampler (greedy, 8 prompts x 32 tokens, 128 new tokens, d=256)
run for real, unrolled vs scanned: under the scan each layer's cache slice is read from and
written back into the stacked cache, a cost the unrolled program does not have.
"""

import argparse
import importlib.util
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's jaxtrace, not an installed one

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxtrace import aot, models, sharding  # noqa: E402
from jaxtrace.rollout import SamplingConfig, make_generate  # noqa: E402


def load_config(path, layers, remat):
    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = aot.with_placeholders(module.get_config())
    c.model.update(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )
    if remat:
        c.model.remat = remat
    c.rollout.update(prompts_per_step=2, group_size=2, max_prompt_len=32, max_privileged_len=48)
    c.rollout.max_new_tokens = 64
    c.eval.batch_size = 2
    c.sft.steps = 0
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c


def decode_seconds(layers, scan, repeats=3):
    """Median wall seconds of one jitted static-sampler call (compiled beforehand)."""
    cfg = models.preset("tiny", num_layers=layers, hidden_size=256, intermediate_size=768)
    graphdef, params = models.create(cfg.replace(scan_layers=scan), seed=0)
    sampling = SamplingConfig(max_prompt_len=32, max_new_tokens=128, greedy=True)
    gen = make_generate(graphdef, sampling)
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, cfg.vocab_size, (8, 32)).astype(np.int32)
    valid = np.ones((8, 32), bool)
    run = lambda: jax.block_until_ready(gen(params, prompt, valid, jax.random.key(0)))  # noqa: E731
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/qwen3_1p7b_trace.py")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--remat", default="", help="override the config's remat policy")
    p.add_argument(
        "--programs",
        default="rl_step+teacher,sampler",
        help="comma-separated program names, or name prefixes ('sampler' = its programs)",
    )
    p.add_argument("--decode", action="store_true", help="also time the static sampler")
    a = p.parse_args()
    wanted = [w for w in a.programs.split(",") if w]  # --programs= : none (with --decode)
    mesh = sharding.make_mesh({"fsdp": -1}, jax.devices()[:1])
    rows = []
    for scan in (False, True) if wanted else ():
        config = load_config(a.config, a.layers, a.remat)
        config.model.scan_layers = scan
        for prog in aot.programs(config, mesh):
            if not any(prog.name == w or prog.name.startswith(w) for w in wanted):
                continue
            t0 = time.perf_counter()
            with sharding.mesh_context(mesh):
                lowered = prog.fn.lower(*prog.args)
                t1 = time.perf_counter()
                compiled = lowered.compile()
            t2 = time.perf_counter()
            lines = len(compiled.as_text().splitlines())
            rows.append((prog.name, "scan" if scan else "unrolled", t1 - t0, t2 - t1, lines))
            print(f"[compile_scan] {rows[-1]}", flush=True)
    if rows:
        print(
            f"\n{a.layers} layers, d=64, {a.config} shapes cut to tiny; remat="
            f"{config.model.remat}; jax {jax.__version__} on {jax.devices()[0].platform}, "
            f"{os.cpu_count()} CPUs\n"
        )
        print("| program | layers | trace+lower s | compile s | HLO lines |")
        print("|---|---|---|---|---|")
        for name, mode, lower_s, compile_s, lines in rows:
            print(f"| {name} | {mode} | {lower_s:.1f} | {compile_s:.1f} | {lines} |")
    if a.decode:
        secs = {scan: decode_seconds(a.layers, scan) for scan in (False, True)}
        print(f"\nstatic sampler, {a.layers} layers d=256, 8 x (32 + 128 greedy), median of 3:")
        print("| layers | decode s |\n|---|---|")
        for scan, sec in secs.items():
            print(f"| {'scan' if scan else 'unrolled'} | {sec:.2f} |")


if __name__ == "__main__":
    main()
