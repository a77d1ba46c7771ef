"""Benchmark span_kl: peak temporary memory and time of forward+backward, reference vs xla.

Memory is XLA's compiled memory analysis (`temp_size_in_bytes`), which needs only compilation,
so it is reported for the whole grid; time is measured only for points with T <= --time_max_T
(CPU is slow at V = 152k). Routes: a random --route_frac of tokens routed (half FKL, half RKL).

    python benchmarks/span_kl.py                      # memory grid + small timing points
    python benchmarks/span_kl.py --T 1024 --D 2048 --repeats 3 --time_max_T 1024
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.span_kl import ROUTE_FKL, ROUTE_RKL, span_kl


def _value_and_grad(implementation, block_t, block_v):
    def loss(h_s, w, h_t, route, c):
        kl = span_kl(
            h_s,
            w,
            route,
            h_teacher_TxD=h_t,
            implementation=implementation,
            block_t=block_t,
            block_v=block_v,
        )
        return jnp.sum(kl * c)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _shapes(num_tokens, d, num_vocab, dtype):
    f = lambda *s: jax.ShapeDtypeStruct(s, dtype)
    return (
        f(num_tokens, d),
        f(d, num_vocab),
        f(num_tokens, d),
        jax.ShapeDtypeStruct((num_tokens,), jnp.int32),
        jax.ShapeDtypeStruct((num_tokens,), jnp.float32),
    )


def _inputs(num_tokens, d, num_vocab, dtype, route_frac, seed=0):
    rng = np.random.default_rng(seed)
    h_s = jnp.asarray(rng.standard_normal((num_tokens, d)), dtype)
    h_t = jnp.asarray(rng.standard_normal((num_tokens, d)), dtype)
    w = jnp.asarray(rng.standard_normal((d, num_vocab)) / np.sqrt(d), dtype)
    routed = rng.random(num_tokens) < route_frac
    route = np.where(routed, rng.choice([ROUTE_FKL, ROUTE_RKL], num_tokens), 0)
    c = jnp.full((num_tokens,), 1.0 / num_tokens, jnp.float32)
    return h_s, w, h_t, jnp.asarray(route, jnp.int32), c


def _time(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--D", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--V", type=int, default=151_936)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (best of); 0: none")
    parser.add_argument("--time_max_T", type=int, default=256, help="time only T <= this")
    parser.add_argument(
        "--time_T",
        type=int,
        nargs="*",
        default=[256],
        help="extra T values timed (and measured) besides --T",
    )
    parser.add_argument("--route_frac", type=float, default=1.0)
    parser.add_argument("--block_t", type=int, default=None)
    parser.add_argument("--block_v", type=int, default=None)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    impls = {
        "reference": _value_and_grad("reference", None, None),
        "xla": _value_and_grad("xla", args.block_t, args.block_v),
    }

    print(
        f"backend={jax.default_backend()} jax={jax.__version__} V={args.V} dtype={args.dtype} "
        f"route_frac={args.route_frac} (forward+backward, value_and_grad)"
    )
    head = f"{'T':>6} {'D':>5} | {'ref temp':>10} {'xla temp':>10} {'mem x':>7} | "
    print(head + f"{'ref s':>8} {'xla s':>8} {'time x':>7}")
    points = sorted({(t, d) for t in args.T + args.time_T for d in args.D})
    for num_tokens, d in points:
        shapes = _shapes(num_tokens, d, args.V, dtype)
        temp = {
            name: fn.lower(*shapes).compile().memory_analysis().temp_size_in_bytes
            for name, fn in impls.items()
        }
        row = (
            f"{num_tokens:>6} {d:>5} | {temp['reference'] / 2**30:>8.2f}Gi "
            f"{temp['xla'] / 2**30:>8.3f}Gi {temp['reference'] / temp['xla']:>6.1f}x | "
        )
        if args.repeats and num_tokens <= args.time_max_T:
            inputs = _inputs(num_tokens, d, args.V, dtype, args.route_frac)
            secs = {name: _time(fn, inputs, args.repeats) for name, fn in impls.items()}
            row += (
                f"{secs['reference']:>8.2f} {secs['xla']:>8.2f} "
                f"{secs['xla'] / secs['reference']:>6.2f}x"
            )
        else:
            row += f"{'-':>8} {'-':>8} {'-':>7}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
