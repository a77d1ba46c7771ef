"""Memory and time of one RL train step, dense attention ("before") vs the chunked online
softmax ("after"), at growing response lengths on CPU.

The model is vs_peers' shape (4 layers, d=256, 8 heads / 4 kv heads, head_dim 32, vocab 4096,
random fp32 weights); the step is `steps.make_rl_step` (GRPO loss) on num_prompts prompts of
prompt_len tokens with group_size responses each, in the shared-prompt layout (one prompt pass
fills a KV cache, the response pass attends over [prompt cache | response] at offset P).
"before" is `ModelConfig.attention_impl="dense"` (the pre-change math: float32 scores
[B, Hkv, G, T, S] and the [B, T, S] mask); "after" is "chunked" with `attention_block`.

Each (implementation, response length) runs in its own subprocess so that peak RSS is its own:
  temp GiB   XLA's compiled `memory_analysis().temp_size_in_bytes` of the step (activations and
             intermediates, the peak-memory figure that does not depend on the allocator)
  RSS GiB    the subprocess's peak resident set (weights, optimizer, compile, everything)
  step s     median of --repeats steps after one compile-and-run call
A row whose compiled temp exceeds --max_run_gib is compiled but not run (its time is "-").

    python benchmarks/attention_memory.py                         # 256, 1024, 4096
    python benchmarks/attention_memory.py --lengths 256 --repeats 1
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's jaxtrace, not an installed one


def one(a, impl: str, response_len: int) -> dict:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from jaxtrace import steps  # noqa: PLC0415
    from jaxtrace.models import ModelConfig, create  # noqa: PLC0415

    cfg = ModelConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=3 * a.hidden,
        num_layers=a.layers,
        num_heads=a.heads,
        num_kv_heads=a.kv_heads,
        head_dim=a.hidden // a.heads,
        rope_theta=1e6,
        tie_word_embeddings=False,
        attention_impl=impl,
        attention_block=a.block,
    )
    graphdef, params = create(cfg, 0)
    rng = np.random.default_rng(0)
    rows = a.num_prompts * a.group_size
    optimizer = steps.make_optimizer(1e-6, 0, 1.0, 0.0, 0.9, 0.99)
    rl_step = steps.make_rl_step(graphdef, optimizer, steps.LossConfig(mode="grpo"))
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
    batch = jax.device_put(
        {
            "prompt": rng.integers(1, a.vocab, (a.num_prompts, a.prompt_len), np.int32),
            "prompt_valid": np.ones((a.num_prompts, a.prompt_len), bool),
            "response": rng.integers(0, a.vocab, (rows, response_len), dtype=np.int32),
            "response_mask": np.ones((rows, response_len), bool),
            "advantages": rng.standard_normal(rows).astype(np.float32),
            "route": np.zeros((rows, response_len), np.int32),
        }
    )
    t0 = time.perf_counter()
    compiled = rl_step.lower(state, batch, jnp.float32(0.0), False).compile()
    compile_s = time.perf_counter() - t0
    temp = compiled.memory_analysis().temp_size_in_bytes
    times = []
    if temp <= a.max_run_gib * 2**30:
        for _ in range(a.repeats + 1):
            t0 = time.perf_counter()
            state, _ = compiled(state, batch, jnp.float32(0.0))
            jax.block_until_ready(state["params"])
            times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "impl": impl,
        "response_len": response_len,
        "temp_gib": temp / 2**30,
        "rss_gib": rss / 2**30,
        "compile_s": compile_s,
        "step_s": statistics.median(times[1:]) if len(times) > 1 else None,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", default="256,1024,4096", help="response lengths")
    p.add_argument("--impls", default="dense,chunked")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--num_prompts", type=int, default=1)
    p.add_argument("--group_size", type=int, default=2)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--block", type=int, default=512, help="ModelConfig.attention_block")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max_run_gib", type=float, default=6.0, help="compile only above this")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # impl,length: child process
    a = p.parse_args(argv)
    if a.one:
        impl, length = a.one.split(",")
        print(json.dumps(one(a, impl, int(length))))
        return 0
    passthrough = list(argv if argv is not None else sys.argv[1:])
    results = []
    for length in (int(x) for x in a.lengths.split(",")):
        for impl in a.impls.split(","):
            me = os.path.abspath(__file__)
            cmd = [sys.executable, me, *passthrough, "--one", f"{impl},{length}"]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                results.append({"impl": impl, "response_len": length, "error": out.returncode})
                continue
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr)
    rows = a.num_prompts * a.group_size
    print(
        f"\nRL step (GRPO), {a.layers} layers, d={a.hidden}, heads {a.heads}/{a.kv_heads}, "
        f"{a.num_prompts} prompt(s) x {a.group_size} = {rows} rows, prompt {a.prompt_len}, "
        f"block {a.block}"
    )
    head = ("response", "attention", "temp GiB", "RSS GiB", "compile s", "step s")
    print("{:>8} {:>10} {:>9} {:>8} {:>9} {:>7}".format(*head))
    for r in results:
        if "error" in r:
            print(f"{r['response_len']:>8} {r['impl']:>10}  failed (exit {r['error']})")
            continue
        step = "-" if r["step_s"] is None else f"{r['step_s']:.2f}"
        print(
            f"{r['response_len']:>8} {r['impl']:>10} {r['temp_gib']:>9.3f} {r['rss_gib']:>8.2f} "
            f"{r['compile_s']:>9.1f} {step:>7}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
