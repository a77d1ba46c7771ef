"""Model FLOPs utilisation of the jaxtrace GRPO train step for Qwen3 0.6B / 1.7B shapes.

The step is the one the trainer runs (`jaxtrace.steps.make_rl_step`, mode grpo: forward over
prompt + response, chunked log-probs on the response, clipped surrogate, AdamW update) on a batch of
--batch sequences of --prompt_len + --response_len tokens, random weights.

Model FLOPs per step (the usual 6N convention, fwd + bwd = 3 x fwd):
  6 * tokens * (per-layer matmul params) + 6 * response tokens * D * V (LM head, response only)
  + 6 * L * heads * head_dim * sum over tokens of their causal context (scores + values).
Embedding lookups, norms, softmax and the optimizer are not counted. XLA's own count
(`compiled.cost_analysis()['flops']`) is printed beside it as a check.

MFU = model FLOPs / step time / peak. The peak is known for TPUs and NVIDIA GPUs by device kind
(dense bf16 unless --peak_tflops says otherwise); on CPU there is no agreed peak, so the table shows
achieved TFLOP/s and MFU only if --peak_tflops is given.

    python benchmarks/mfu.py                              # CPU: both shapes, 2 layers deep
    python benchmarks/mfu.py --layers 0 --dtype bfloat16     # GPU/TPU: full depth, bf16
    python benchmarks/mfu.py --models qwen3_1p7b --batch 16 --prompt_len 512 --response_len 1024

--layers N keeps the real width and cuts the depth to N (0 = the model's full depth); per-layer
cost is what MFU measures, and a 1.7B fp32 AdamW state does not fit a 24 GiB CPU host.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak TFLOP/s per chip, by substring of jax's device_kind.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; PCIe parts are lower, pass --peak_tflops
    "A100": 312.0,
    "TPU v6": 918.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v4": 275.0,
}


def model_flops(cfg, batch, prompt_len, response_len):
    """Model FLOPs of one train step (see the module docstring)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    attn_params = d * hd * (cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_heads * hd * d
    layer_params = attn_params + 3 * d * cfg.intermediate_size
    seq = prompt_len + response_len
    tokens = batch * seq
    context = batch * seq * (seq + 1) / 2  # token t attends to t tokens (causal)
    dense = 6 * tokens * cfg.num_layers * layer_params
    attention = 6 * cfg.num_layers * cfg.num_heads * hd * 2 * context
    head = 6 * batch * response_len * d * cfg.vocab_size
    return dense + attention + head


def peak_tflops(device, override):
    if override:
        return override
    kind = device.device_kind
    for key, tflops in PEAK_TFLOPS.items():
        if key in kind:
            return tflops
    return None


def bench(name, a):
    from jaxtrace import steps  # noqa: PLC0415
    from jaxtrace.models import create, preset  # noqa: PLC0415

    overrides = {"dtype": a.dtype, "param_dtype": a.param_dtype}
    if a.layers:
        overrides["num_layers"] = a.layers
    cfg = preset(name, **overrides)
    graphdef, params = create(cfg, 0)
    optimizer = steps.make_optimizer(1e-6, 0, 1.0, 0.0, 0.9, 0.99)
    step = steps.make_rl_step(graphdef, optimizer, steps.LossConfig(mode="grpo"))
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
    rng = np.random.default_rng(0)
    b, p, r = a.batch, a.prompt_len, a.response_len
    batch = jax.device_put(
        {
            "prompt": rng.integers(0, cfg.vocab_size, (b, p), dtype=np.int32),
            "prompt_valid": np.ones((b, p), bool),
            "response": rng.integers(0, cfg.vocab_size, (b, r), dtype=np.int32),
            "response_mask": np.ones((b, r), bool),
            "advantages": rng.standard_normal(b).astype(np.float32),
            "route": np.zeros((b, r), np.int32),
        }
    )
    lam = jnp.float32(0.0)
    compiled = step.lower(state, batch, lam, False).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    state, _ = step(state, batch, lam, False)  # warm-up
    jax.block_until_ready(state)
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        state, _ = step(state, batch, lam, False)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    flops = model_flops(cfg, b, p, r)
    return {
        "model": name,
        "layers": cfg.num_layers,
        "tokens": b * (p + r),
        "step_s": med,
        "model_tflop": flops / 1e12,
        "xla_tflop": xla_flops / 1e12,
        "achieved_tflops": flops / med / 1e12,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="qwen3_0p6b,qwen3_1p7b")
    p.add_argument("--layers", type=int, default=2, help="cut depth to N layers; 0 = full depth")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--response_len", type=int, default=128)
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on accelerators)")
    p.add_argument("--param_dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=0.0, help="per-device peak override")
    a = p.parse_args(argv)

    device = jax.devices()[0]
    peak = peak_tflops(device, a.peak_tflops)
    rows = [bench(name, a) for name in a.models.split(",")]
    print(
        f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
        f"batch {a.batch} x (prompt {a.prompt_len} + response {a.response_len}), "
        f"compute {a.dtype}, params {a.param_dtype}, median of {a.repeats}; "
        f"peak {f'{peak:.0f} TFLOP/s' if peak else 'unknown (CPU): MFU not shown'}"
    )
    print()
    print(
        "| model | layers | tokens/step | step s | model TFLOP | XLA TFLOP | achieved TFLOP/s "
        "| tokens/s | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['achieved_tflops'] / peak:.1f}%" if peak else "-"
        print(
            f"| {r['model']} | {r['layers']} | {r['tokens']} | {r['step_s']:.3f} "
            f"| {r['model_tflop']:.3f} | {r['xla_tflop']:.3f} | {r['achieved_tflops']:.4f} "
            f"| {r['tokens'] / r['step_s']:,.0f} | {mfu} |"
        )


if __name__ == "__main__":
    main()
