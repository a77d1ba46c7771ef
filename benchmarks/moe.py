"""MoE dispatch (sort + grouped matmul) vs a dense one-hot einsum baseline. Prints a table.

    python benchmarks/moe.py                                  # default grid (slow on CPU)
    python benchmarks/moe.py --tokens=2048 --d_model=1024 --experts=64 --implementation=xla
    python benchmarks/moe.py --tokens=2048,4096 --experts=64,128 --top_k=8 --ffn=768 --reps=3

The baseline computes every expert on every token (E/K times the routed FLOPs), as a model
without a dispatch op would; `ratio` = baseline time / dispatch time (> 1: dispatch wins).
Dense baselines whose [E, T, F] activations exceed --dense_limit_gb are skipped.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from pallas_kernels import moe_dispatch as md


def _ints(text):
    return [int(v) for v in text.split(",")]


def _time(fn, *args, reps):
    jax.block_until_ready(fn(*args))  # compile + warm up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _problem(t, d, e, k, f, dtype):
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (t, d), dtype)
    w_gate = (jax.random.normal(keys[1], (e, d, f)) / d**0.5).astype(dtype)
    w_up = (jax.random.normal(keys[2], (e, d, f)) / d**0.5).astype(dtype)
    w_down = (jax.random.normal(keys[3], (e, f, d)) / f**0.5).astype(dtype)
    weights, ids, _ = md.route_topk(jax.random.normal(keys[4], (t, e)), k)
    return x, weights, ids, w_gate, w_up, w_down


def _fwd_bwd(fn):
    def loss(x, weights, ids, wg, wu, wd):
        return jnp.sum(fn(x, weights, ids, wg, wu, wd).astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 3, 4, 5)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=_ints, default=[2048, 4096, 16384])
    parser.add_argument("--d_model", type=_ints, default=[1024, 2048])
    parser.add_argument("--experts", type=_ints, default=[64, 128])
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--implementation", default="xla", choices=md.IMPLEMENTATIONS)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dense_limit_gb", type=float, default=8.0)
    parser.add_argument("--no_backward", action="store_true")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)

    def ours(x, weights, ids, wg, wu, wd):
        return md.moe_ffn(x, (weights, ids), wg, wu, wd, implementation=args.implementation)[0]

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
          f"{args.dtype}, implementation={args.implementation}, "
          f"K={args.top_k}, F={args.ffn}")  # fmt: skip
    header = f"{'T':>6} {'D':>5} {'E':>4} | {'fwd ms':>9} {'dense ms':>9} {'ratio':>6}"
    if not args.no_backward:
        header += f" | {'f+b ms':>9} {'dense ms':>9} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for t in args.tokens:
        for d in args.d_model:
            for e in args.experts:
                problem = _problem(t, d, e, args.top_k, args.ffn, dtype)
                dense_gb = 3 * e * t * args.ffn * 4 / 2**30
                run_dense = dense_gb <= args.dense_limit_gb
                row = f"{t:>6} {d:>5} {e:>4} |"
                fwd = _time(jax.jit(ours), *problem, reps=args.reps)
                dense = (
                    _time(jax.jit(md.moe_ffn_reference), *problem, reps=args.reps)
                    if run_dense
                    else None
                )
                row += f" {fwd:>9.1f} " + (
                    f"{dense:>9.1f} {dense / fwd:>6.2f}" if dense else f"{'skip':>9} {'-':>6}"
                )
                if not args.no_backward:
                    fb = _time(_fwd_bwd(ours), *problem, reps=args.reps)
                    dense_fb = (
                        _time(_fwd_bwd(md.moe_ffn_reference), *problem, reps=args.reps)
                        if run_dense
                        else None
                    )
                    row += f" | {fb:>9.1f} " + (
                        f"{dense_fb:>9.1f} {dense_fb / fb:>6.2f}"
                        if dense_fb
                        else f"{'skip':>9} {'-':>6}"
                    )
                print(row, flush=True)


if __name__ == "__main__":
    main()
