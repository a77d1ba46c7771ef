"""Step memory vs micro-batch size, from XLA's own memory analysis of the compiled RL step, and
the check of `jaxtrace.microbatch.activation_bytes_per_row` against it.

Compiles (nothing runs) the RL step of a small dense Qwen3 (4 layers, d=256, as vs_peers) on
the local backend at one batch and several `micro_batch_rows`, and prints per size XLA's
temporaries (`temp_size_in_bytes`), then the measured bytes per micro-batch row (the slope of
temporaries between two micro-batch sizes) next to the estimate, and their ratio:

    JAX_PLATFORMS=cpu python benchmarks/microbatch_memory.py
    JAX_PLATFORMS=cpu python benchmarks/microbatch_memory.py --remat --response 512

On TPU the figure that matters is the AOT tool's (`python -m jaxtrace.compile ...
--config.train.micro_batch_rows=R`), whose buffer assignment differs from the CPU compiler's.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

from jaxtrace import microbatch, models, steps
from jaxtrace.models.config import ModelConfig


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def temp_bytes(cfg, rows, group, prompt_len, response_len, micro_rows):
    graphdef, params = models.create(cfg, 0)
    opt = optax.sgd(1e-3)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}
    g = rows // group
    s = jax.ShapeDtypeStruct
    batch = {
        "prompt": s((g, prompt_len), jnp.int32),
        "prompt_valid": s((g, prompt_len), jnp.bool_),
        "response": s((rows, response_len), jnp.int32),
        "response_mask": s((rows, response_len), jnp.bool_),
        "advantages": s((rows,), jnp.float32),
        "route": s((rows, response_len), jnp.int32),
    }
    step = steps.make_rl_step(graphdef, opt, steps.LossConfig(mode="grpo"), micro_rows)
    compiled = step.lower(_abstract(state), batch, s((), jnp.float32), False).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=192)
    ap.add_argument("--remat", action="store_true")
    args = ap.parse_args()
    cfg = ModelConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=768,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        remat=args.remat,
    )
    sizes = [r for r in (args.rows, args.rows // 2, args.rows // 4) if r % args.group == 0]
    print(
        f"backend {jax.default_backend()}, {cfg.num_layers} layers d={cfg.hidden_size}, "
        f"remat={cfg.remat}, {args.rows} rows, P={args.prompt} N={args.response}"
    )
    print("| micro_batch_rows | XLA temporaries (MiB) |")
    print("| ---: | ---: |")
    temps = {}
    for r in sizes:
        temps[r] = temp_bytes(cfg, args.rows, args.group, args.prompt, args.response, r)
        label = f"{r} (whole batch)" if r == args.rows else str(r)
        print(f"| {label} | {temps[r] / 2**20:.1f} |")
    micro = [r for r in sizes if r != args.rows]
    estimate = microbatch.activation_bytes_per_row(cfg, args.prompt, args.response)
    if len(micro) >= 2:
        a, b = micro[0], micro[-1]
        measured = (temps[a] - temps[b]) / (a - b)
        print(
            f"\nmeasured bytes per micro-batch row (slope {b}->{a} rows): {measured / 2**20:.2f} "
            f"MiB; activation_bytes_per_row estimate: {estimate / 2**20:.2f} MiB; "
            f"estimate / measured = {estimate / measured:.2f}"
        )


if __name__ == "__main__":
    main()
