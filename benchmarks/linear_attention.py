"""Chunked linear attention vs plain causal softmax attention: time and compiled temp memory.

    python benchmarks/linear_attention.py                        # T = 1k .. 16k
    python benchmarks/linear_attention.py --seq_lens=1024,2048,4096 --heads=1 --grad

Prints one row per T and the log-log slope of each column (time ~ T^slope): linear attention
should sit near 1, softmax attention near 2 (both in time and in temp memory), and the row
where linear attention becomes faster (the crossover). Memory is XLA's compiled
`temp_size_in_bytes` (scratch buffers, excluding inputs/outputs), so nothing big is needed to
measure it; set --softmax_max_len to skip timing softmax where [T, T] would not fit.
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.linear_attention import linear_attention


def softmax_attention(q, k, v):
    """Plain jnp causal attention, [B, T, H, D] -> [B, T, H, D]; materialises [T, T]."""
    t = q.shape[1]
    logits = jnp.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
    return jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(logits, axis=-1), v)


def linear(q, k, v, log_g, *, chunk):
    return linear_attention(q, k, v, log_g, chunk_size=chunk, implementation="xla")[0]


def _as_loss(fn):
    """Forward + backward: grads of sum(o) w.r.t. q, k, v."""
    return jax.grad(lambda q, k, v, *rest: jnp.sum(fn(q, k, v, *rest)), argnums=(0, 1, 2))


def measure(fn, args, repeats):
    """(median seconds per call, compiled temp bytes)."""
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), temp


def slope(ts, ys):
    ok = [(t, y) for t, y in zip(ts, ys) if np.isfinite(y) and y > 0]
    if len(ok) < 2:
        return float("nan")
    x, y = np.log([t for t, _ in ok]), np.log([y for _, y in ok])
    return float(np.polyfit(x, y, 1)[0])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq_lens", default="1024,2048,4096,8192,16384")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--grad", action="store_true", help="time forward + backward")
    p.add_argument("--softmax_max_len", type=int, default=16384)
    a = p.parse_args()
    lens = [int(x) for x in a.seq_lens.split(",")]
    lin_fn = functools.partial(linear, chunk=a.chunk)
    sm_fn = softmax_attention
    if a.grad:
        lin_fn, sm_fn = _as_loss(lin_fn), _as_loss(sm_fn)
    mode = "fwd+bwd" if a.grad else "fwd"
    print(f"{jax.devices()[0].platform}, jax {jax.__version__}, {mode}, B={a.batch} "
          f"H={a.heads} D={a.dim} chunk={a.chunk}, float32")  # fmt: skip
    print(f"{'T':>6} | {'linear ms':>10} {'linear MiB':>10} | {'softmax ms':>10} "
          f"{'softmax MiB':>11} | faster")  # fmt: skip
    rows = []
    for t in lens:
        r = np.random.default_rng(t)
        shape = (a.batch, t, a.heads, a.dim)
        q, k, v = (jnp.asarray(r.normal(size=shape) * 0.3, jnp.float32) for _ in range(3))
        log_g = jnp.full((a.batch, t, a.heads), -0.01, jnp.float32)
        lin = measure(lin_fn, (q, k, v, log_g), a.repeats)
        sm = (float("nan"), float("nan"))
        if t <= a.softmax_max_len:
            sm = measure(sm_fn, (q, k, v), a.repeats)
        rows.append((t, *lin, *sm))
        faster = "linear" if lin[0] < sm[0] else ("softmax" if np.isfinite(sm[0]) else "-")
        print(f"{t:>6} | {lin[0] * 1e3:>10.1f} {lin[1] / 2**20:>10.1f} | {sm[0] * 1e3:>10.1f} "
              f"{sm[1] / 2**20:>11.1f} | {faster}", flush=True)  # fmt: skip
    cols = list(zip(*rows))
    print(f"{'slope':>6} | {slope(cols[0], cols[1]):>10.2f} {slope(cols[0], cols[2]):>10.2f} | "
          f"{slope(cols[0], cols[3]):>10.2f} {slope(cols[0], cols[4]):>11.2f} |")  # fmt: skip
    cross = next((r[0] for r in rows if r[1] < r[3]), None)
    print(f"crossover: linear attention faster from T = {cross}" if cross else "no crossover")


if __name__ == "__main__":
    main()
