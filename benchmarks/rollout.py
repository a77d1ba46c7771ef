"""Decode throughput: jaxtrace's KV-cache sampler vs `transformers.generate`, same tiny model;
and the continuous rollout engine vs the static sampler on ragged workloads.

    python benchmarks/rollout.py [--batch 8] [--prompt 32] [--new 64] [--repeats 5]
    python benchmarks/rollout.py --mode longtail [--budget 2048] [--prompts 8] [--samples 8]
    python benchmarks/rollout.py --mode per_step [--budgets 256,2048,8192] [--short 32]

uniform (default): both decode greedily for exactly --new tokens (no stop token) from the same
random Qwen3 weights (float32, CPU). Compile time is excluded (one warm-up call); the table shows
median wall time over --repeats and generated tokens per second.

longtail: --prompts x --samples rows sampled at temperature 1 with a budget of --budget tokens;
each row's length is forced by a per-row budget (`max_new_B` [R]), so both engines generate the
same tokens: --long_frac of the rows run to the budget, the rest stop in its first --short_frac.
Real tokens/s counts only generated tokens; --repeats rounds call every engine once each,
interleaved. The engine's warm-up call runs the same workload (compiling every bucket shape it
visits); its extra time over the median is reported as compile.

per_step: every row stops after --short tokens; decode seconds per step (median call time /
--short) at each budget of --budgets: flat when a step's cost follows the filled length.
"""

import argparse
import functools
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch


def _timed(fn, repeats, warm=None):
    """(warm-up seconds, median seconds of `repeats` calls after the warm-up call `warm`, the
    last call's output)."""
    t = time.perf_counter()
    out = (warm or fn)()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times), out


def _rollout(gen, params, ids, valid, lengths):
    return jax.block_until_ready(gen(params, ids, valid, jax.random.key(0), lengths))


def _ragged_model(args):
    from jaxtrace.models import ModelConfig, create  # noqa: PLC0415

    cfg = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_layers=args.layers,
        num_heads=8,
        num_kv_heads=4,
        head_dim=args.hidden // 8,
        rope_theta=1e6,
        tie_word_embeddings=False,
    )
    return create(cfg, seed=0)


def _engines(args, graphdef, sampling, names):
    from jaxtrace.rollout import engine, make_generate  # noqa: PLC0415

    out = {}
    for name in names:
        if name == "static":
            out[name] = make_generate(graphdef, sampling)
        else:  # continuous[:slots]
            slots = int(name.split(":")[1]) if ":" in name else 0
            out[name] = engine.make_generate(graphdef, sampling, num_slots=slots)
    return out


def ragged_main(args):
    """--mode longtail / per_step: the continuous engine vs the static sampler."""
    from jaxtrace.rollout import SamplingConfig  # noqa: PLC0415

    graphdef, params = _ragged_model(args)
    rng = np.random.default_rng(args.seed)
    names = args.engines.split(",")
    head = (
        f"model: Qwen3 {args.layers} layers, d={args.hidden}, vocab={args.vocab}, fp32; prompt "
        f"{args.prompt}; backend {jax.default_backend()}, {os.cpu_count()} CPUs; medians of "
        f"{args.repeats} calls after one warm-up call"
    )
    if args.mode == "longtail":
        b, n, budget = args.prompts, args.samples, args.budget
        r = b * n
        n_long = max(1, round(args.long_frac * r))
        short_max = max(2, int(args.short_frac * budget))
        lengths = rng.integers(max(1, short_max // 4), short_max + 1, r)
        lengths[rng.permutation(r)[:n_long]] = budget
        sampling = SamplingConfig(
            max_prompt_len=args.prompt, max_new_tokens=budget, temperature=1.0, num_samples=n
        )
        ids = rng.integers(1, args.vocab, (b, args.prompt), dtype=np.int32)
        valid = np.ones(ids.shape, bool)
        fns, compile_s, times = {}, {}, {}
        for name, gen in _engines(args, graphdef, sampling, names).items():
            fns[name] = functools.partial(_rollout, gen, params, ids, valid, lengths)
            # The static sampler compiles one program whatever the lengths: warm it up on
            # one-token rows (its full run can take minutes); the engine on the workload itself
            # (its compile time = that call minus the median).
            ones = np.ones_like(lengths)
            warm = _rollout if name == "static" else None
            t = time.perf_counter()
            (warm or _rollout)(gen, params, ids, valid, ones if warm else lengths)
            compile_s[name], times[name] = time.perf_counter() - t, []
        for _ in range(args.repeats):  # interleaved rounds: load drift hits every engine alike
            for name, fn in fns.items():
                t = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t)
                got = np.asarray(out["length"])
                assert np.array_equal(got, lengths), f"{name}: lengths differ from the forced ones"
        rows = []
        for name, ts in times.items():
            med = statistics.median(ts)
            comp = compile_s[name] - (0 if name == "static" else med)
            rows.append((name, med, lengths.sum() / med, comp))
        print(
            f"{head}\nlong tail: {b} prompts x {n} samples, budget {budget}; {n_long} rows run "
            f"to the budget, {r - n_long} stop within {short_max} tokens; {lengths.sum()} real "
            "tokens"
        )
        print(f"{'engine':<18}{'median s':>10}{'real tok/s':>12}{'vs static':>10}{'compile s':>11}")
        print("(compile s: static = its warm-up call on one-token rows; continuous = its first")
        print(" call minus the median: compiling every (slots, cache length) shape it visits)")
        base = {n: tps for n, _, tps, _ in rows}.get("static")
        for name, med, tps, comp in rows:
            ratio = f"{tps / base:>10.2f}" if base else f"{'-':>10}"
            print(f"{name:<18}{med:>10.3f}{tps:>12.1f}{ratio}{comp:>11.1f}")
        return
    b, n = args.prompts, args.samples
    ids = rng.integers(1, args.vocab, (b, args.prompt), dtype=np.int32)
    valid = np.ones(ids.shape, bool)
    lengths = np.full(b * n, args.short, np.int32)
    table = []
    for budget in [int(x) for x in args.budgets.split(",")]:
        sampling = SamplingConfig(
            max_prompt_len=args.prompt, max_new_tokens=budget, temperature=1.0, num_samples=n
        )
        for name, gen in _engines(args, graphdef, sampling, names).items():
            fn = functools.partial(_rollout, gen, params, ids, valid, lengths)
            _, med, out = _timed(fn, args.repeats)
            assert np.array_equal(np.asarray(out["length"]), lengths), name
            table.append((budget, name, med, 1e3 * med / args.short))
    print(f"{head}\nper step: {b} prompts x {n} samples, every row stops at {args.short} tokens")
    print(f"{'budget':>8}  {'engine':<18}{'median s':>10}{'ms / step':>11}")
    for budget, name, med, ms in table:
        print(f"{budget:>8}  {name:<18}{med:>10.3f}{ms:>11.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("uniform", "longtail", "per_step"), default="uniform")
    ap.add_argument(
        "--engines",
        default="static,continuous",
        help="longtail / per_step: "
        "static, continuous, continuous:SLOTS (a fixed number of decode slots)",
    )
    ap.add_argument("--prompts", type=int, default=8, help="longtail / per_step")
    ap.add_argument("--samples", type=int, default=8, help="longtail / per_step")
    ap.add_argument("--budget", type=int, default=2048, help="longtail")
    ap.add_argument("--long_frac", type=float, default=0.1, help="longtail")
    ap.add_argument("--short_frac", type=float, default=0.1, help="longtail")
    ap.add_argument("--budgets", default="256,2048,8192", help="per_step")
    ap.add_argument("--short", type=int, default=32, help="per_step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--torch_threads", type=int, default=0, help="0 = torch's default")
    args = ap.parse_args()
    if args.mode != "uniform":
        return ragged_main(args)
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
