"""Decode throughput: jaxtrace's KV-cache sampler vs `transformers.generate`, same tiny model.

    python benchmarks/rollout.py [--batch 8] [--prompt 32] [--new 64] [--repeats 5]

Both decode greedily for exactly --new tokens (no stop token) from the same random Qwen3 weights
(float32, CPU). Compile time is excluded (one warm-up call); the table shows median wall time
over --repeats and generated tokens per second.
"""

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--torch_threads", type=int, default=0, help="0 = torch's default")
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    from transformers import Qwen3Config, Qwen3ForCausalLM

    from jaxtrace.models import hf
    from jaxtrace.rollout import SamplingConfig, make_generate

    torch.manual_seed(0)
    hf_cfg = Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=args.hidden // 8,
        max_position_embeddings=4096,
    )
    model = Qwen3ForCausalLM(hf_cfg).eval().float()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        _, graphdef, params = hf.load_hf(d)
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.prompt))

    cfg = SamplingConfig(max_prompt_len=args.prompt, max_new_tokens=args.new, greedy=True)
    generate = make_generate(graphdef, cfg)
    valid = np.ones(ids.shape, bool)

    def ours():
        out = generate(params, ids.astype(np.int32), valid, jax.random.key(0), None)
        jax.block_until_ready(out)
        return out

    def theirs():
        with torch.no_grad():
            return model.generate(
                torch.tensor(ids),
                max_new_tokens=args.new,
                min_new_tokens=args.new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )

    rows = []
    for name, fn in (("jaxtrace sampler", ours), ("transformers.generate", theirs)):
        fn()  # warm-up / compile
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        rows.append((name, med, args.batch * args.new / med))
    # Same tokens?
    same = np.array_equal(np.asarray(ours()["response"]), theirs()[:, args.prompt :].numpy())
    print(
        f"model: Qwen3 {args.layers} layers, d={args.hidden}, vocab={args.vocab}, fp32; "
        f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens; "
        f"backend {jax.default_backend()}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'implementation':<24}{'median s':>10}{'tokens/s':>12}{'ratio':>8}")
    for name, med, tps in rows:
        print(f"{name:<24}{med:>10.3f}{tps:>12.1f}{tps / rows[1][2]:>8.2f}")
    print(f"identical greedy tokens: {same}")


if __name__ == "__main__":
    main()
