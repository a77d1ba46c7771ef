"""Every Pallas TPU op, forward + backward, compiled ahead of time for one chip of each TPU
generation (libtpu; no TPU needed) at real model widths; prints a table.

    make venv-tpu && .venv/bin/python benchmarks/tpu_kernels.py [--chips v4 v5e] [--ops span_kl]

A VMEM overflow or a Mosaic error shows as the row's first error line. The span KL blocks are
the ones the op picks for that chip (`kernel_tpu.choose_blocks`).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxtrace import tpu_topology  # noqa: E402
from pallas_kernels import moe_dispatch, span_kl  # noqa: E402
from pallas_kernels.linear_attention import hybrid_attention  # noqa: E402
from pallas_kernels.span_kl import kernel_tpu  # noqa: E402

CHIPS = {"v4": "v4-2", "v5e": "v5e-1", "v5p": "v5p-2", "v6e": "v6e-1"}
bf16, f32 = jnp.bfloat16, jnp.float32


def span_kl_case(t, d, v, dtype):
    def loss(h, w, ht, route):
        kl = span_kl.span_kl(h, w, route, h_teacher_TxD=ht, implementation="pallas_tpu")
        return jnp.sum(kl)

    shapes = [((t, d), dtype), ((d, v), dtype), ((t, d), dtype), ((t,), jnp.int32)]
    return jax.grad(loss, argnums=(0, 1)), shapes


def moe_case(t, d, f, e, k, dtype):
    def loss(x, logits, wg, wu, wd):
        y, _ = moe_dispatch.moe_ffn(x, logits, wg, wu, wd, top_k=k, implementation="pallas_tpu")
        return jnp.sum(y.astype(f32))

    shapes = [((t, d), dtype), ((t, e), dtype), ((e, d, f), dtype), ((e, d, f), dtype)]
    return jax.grad(loss, argnums=(0, 2, 3, 4)), shapes + [((e, f, d), dtype)]


def hybrid_case(b, t, h, kv, hd, window, dtype):
    def loss(q, k, v):
        return jnp.sum(hybrid_attention(q, k, v, window=window, implementation="pallas_tpu"))

    return jax.grad(loss, argnums=(0, 1, 2)), [((b, t, h, hd), dtype)] + [
        ((b, t, kv, hd), dtype)
    ] * 2


CASES = {
    "span_kl": [
        ("T=4096 D=2048 V=151936 bf16 (1.7B, 30B-A3B)", span_kl_case(4096, 2048, 151936, bf16)),
        ("T=4096 D=4096 V=151936 bf16 (8B)", span_kl_case(4096, 4096, 151936, bf16)),
        ("T=1000 D=1024 V=32001 f32", span_kl_case(1000, 1024, 32001, f32)),
    ],
    "moe_gmm": [
        ("T=4096 D=2048 F=768 E=128 top-8 bf16 (30B-A3B)", moe_case(4096, 2048, 768, 128, 8, bf16)),
    ],
    "hybrid_attention": [
        (
            "B=1 T=4096 H=16 K=8 hd=128 w=512 bf16 (1.7B)",
            hybrid_case(1, 4096, 16, 8, 128, 512, bf16),
        ),
        ("B=1 T=4096 H=32 K=8 hd=128 w=512 bf16 (8B)", hybrid_case(1, 4096, 32, 8, 128, 512, bf16)),
    ],
}


def compile_one(fn, shapes, device):
    mesh = Mesh(np.asarray([device]), ("data",))
    args = [jax.ShapeDtypeStruct(s, dt, sharding=NamedSharding(mesh, P())) for s, dt in shapes]
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            jax.jit(fn).lower(*args).compile()
        return "compiled", time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 (report, do not stop)
        line = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        return f"error: {line[:140]}", time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--chips", nargs="*", default=list(CHIPS), choices=list(CHIPS))
    p.add_argument("--ops", nargs="*", default=list(CASES), choices=list(CASES))
    args = p.parse_args()
    print("| op | shape | chip | VMEM MiB | span_kl blocks | result | compile s |")
    print("|---|---|---|---|---|---|---|")
    for chip_name in args.chips:
        topo = tpu_topology.parse(CHIPS[chip_name])
        device = tpu_topology.devices(topo)[0]
        vmem = tpu_topology.chip(topo).vmem_bytes
        for op in args.ops:
            for shape, (fn, shapes) in CASES[op]:
                blocks = ""
                if op == "span_kl":
                    d, itemsize = shapes[0][0][1], jnp.dtype(shapes[0][1]).itemsize
                    blocks = "x".join(map(str, kernel_tpu.choose_blocks(d, itemsize, vmem)))
                result, seconds = compile_one(fn, shapes, device)
                print(
                    f"| {op} | {shape} | {chip_name} | {vmem >> 20} | {blocks} | {result} | "
                    f"{seconds:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
