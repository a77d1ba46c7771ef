"""jaxtrace against its peers on one machine: a GRPO training step vs google-tunix's GRPO learner,
and decode throughput vs tunix's sampler and `transformers.generate`.

Every row uses the same Qwen3 shape (random fp32 weights), the same batch and sequence lengths:

  train step, rollout excluded   one policy update on a fixed batch of num_prompts x group_size
                                 sequences (prompt_len + response_len tokens; the group_size
                                 sequences of a prompt share it, as in GRPO); tokens/s counts
                                 every token of the batch, each prompt once per sequence.
  train step, rollout included   sample group_size responses per prompt (temperature 1), score
                                 them, group advantages, one update; tokens/s counts the tokens
                                 generated in the step.
  decode                         greedy, exactly --new tokens for --batch prompts (KV cache).

Each timer is called once to compile; then --repeats rounds call every implementation of a
benchmark once each, interleaved, so that drift in the machine's speed hits them alike. The table
shows medians and the ratio of jaxtrace to each peer. tunix lives in its own virtualenv (it pins
its own dependencies):

    make bench-peers                       # creates .venv-peers (jaxtrace + tunix), runs this
    .venv-peers/bin/python benchmarks/vs_peers.py --repeats 7 --layers 4 --hidden 256

Without tunix installed the tunix rows are reported as missing and everything else runs.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def shape_from_args(a):
    return dict(
        num_layers=a.layers,
        vocab_size=a.vocab,
        embed_dim=a.hidden,
        hidden_dim=3 * a.hidden,
        num_heads=a.heads,
        head_dim=a.hidden // a.heads,
        num_kv_heads=a.kv_heads,
        rope_theta=1e6,
        norm_eps=1e-6,
        tied=False,
    )


def jaxtrace_model(shape, seed=0):
    from jaxtrace.models import ModelConfig, create  # noqa: PLC0415

    cfg = ModelConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["embed_dim"],
        intermediate_size=shape["hidden_dim"],
        num_layers=shape["num_layers"],
        num_heads=shape["num_heads"],
        num_kv_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"],
        rope_theta=shape["rope_theta"],
        rms_norm_eps=shape["norm_eps"],
        tie_word_embeddings=shape["tied"],
    )
    return create(cfg, seed)


# ------------------------------------------------------------------------------------ jaxtrace
def jaxtrace_timers(shape, a):
    """(train step without rollout, train step with rollout, decode) timers for jaxtrace."""
    from jaxtrace import rl, steps  # noqa: PLC0415
    from jaxtrace.losses import grpo as grpo_lib  # noqa: PLC0415
    from jaxtrace.rollout import SamplingConfig, engine  # noqa: PLC0415
    from jaxtrace.rollout import make_generate as static_generate  # noqa: PLC0415

    make_generate = engine.make_generate if a.engine == "continuous" else static_generate
    graphdef, params = jaxtrace_model(shape)
    rng = np.random.default_rng(0)
    b = a.num_prompts * a.group_size
    optimizer = steps.make_optimizer(1e-6, 0, 1.0, 0.0, 0.9, 0.99)
    rl_step = steps.make_rl_step(graphdef, optimizer, steps.LossConfig(mode="grpo"))
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
    batch = {  # one row per prompt: its group_size responses share it (steps.response_hidden)
        "prompt": rng.integers(1, shape["vocab_size"], (a.num_prompts, a.prompt_len), np.int32),
        "prompt_valid": np.ones((a.num_prompts, a.prompt_len), bool),
        "response": rng.integers(0, shape["vocab_size"], (b, a.response_len), dtype=np.int32),
        "response_mask": np.ones((b, a.response_len), bool),
        "advantages": rng.standard_normal(b).astype(np.float32),
        "route": np.zeros((b, a.response_len), np.int32),
    }
    if a.repeat_prompts:  # ablation: every row carries its own copy of the prompt
        batch["prompt"], batch["prompt_valid"] = (
            np.repeat(batch[k], a.group_size, axis=0) for k in ("prompt", "prompt_valid")
        )
    batch = jax.device_put(batch)

    def train_step():
        nonlocal state
        state, m = rl_step(state, batch, jnp.float32(0.0), False)
        jax.block_until_ready(state["params"])
        return b * (a.prompt_len + a.response_len)

    sample = make_generate(
        graphdef,
        SamplingConfig(
            max_prompt_len=a.prompt_len,
            max_new_tokens=a.response_len,
            temperature=1.0,
            num_samples=a.group_size,
        ),
    )
    prompts = rng.integers(1, shape["vocab_size"], (a.num_prompts, a.prompt_len), dtype=np.int32)
    prompt_valid = np.ones(prompts.shape, bool)
    calls = 0

    def full_step():
        nonlocal state, calls
        calls += 1
        out = sample(state["params"], prompts, prompt_valid, jax.random.key(calls), None)
        out = jax.tree.map(np.asarray, out)
        mask = out["response_mask"]
        rewards = (mask.sum(1) % 2).astype(np.float32)  # the same trivial reward as tunix's row
        adv, _ = grpo_lib.group_advantages(rewards, a.group_size)
        prompt, valid = out["prompt"], out["prompt_valid"]
        if not a.repeat_prompts:
            prompt, valid = rl.group_prompts(prompt, valid, a.group_size)
        full = {
            "prompt": prompt,
            "prompt_valid": valid,
            "response": out["response"],
            "response_mask": mask,
            "advantages": np.asarray(adv, np.float32),
            "route": np.zeros(mask.shape, np.int32),
        }
        state, _ = rl_step(state, full, jnp.float32(0.0), False)
        jax.block_until_ready(state["params"])
        return int(mask.sum())

    greedy = make_generate(
        graphdef, SamplingConfig(max_prompt_len=a.prompt_len, max_new_tokens=a.new, greedy=True)
    )
    ids = rng.integers(1, shape["vocab_size"], (a.batch, a.prompt_len), dtype=np.int32)
    ids_valid = np.ones(ids.shape, bool)

    def decode():
        out = greedy(state["params"], ids, ids_valid, jax.random.key(0), None)
        return int(np.asarray(out["response_mask"]).sum())

    return train_step, full_step, decode


# -------------------------------------------------------------------------------- transformers
def transformers_decode_timer(shape, a):
    import torch  # noqa: PLC0415
    from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: PLC0415

    torch.set_num_threads(a.torch_threads or os.cpu_count())
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["embed_dim"],
        intermediate_size=shape["hidden_dim"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"],
        rope_theta=shape["rope_theta"],
        rms_norm_eps=shape["norm_eps"],
        tie_word_embeddings=shape["tied"],
        max_position_embeddings=4096,
    )
    model = Qwen3ForCausalLM(cfg).eval().float()
    ids = torch.tensor(
        np.random.default_rng(0).integers(1, shape["vocab_size"], (a.batch, a.prompt_len))
    )

    def decode():
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=a.new,
                min_new_tokens=a.new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        return int(out.shape[0] * (out.shape[1] - a.prompt_len))

    return decode


# -------------------------------------------------------------------------------------- timing
def measure(timers, repeats):
    """{name: (median s, median tokens/s)} for the timers of one benchmark, after one warm-up call
    each. Rounds interleave the implementations (round i calls each once), so a drift in the
    machine's speed during the run shifts every implementation alike."""
    for fn in timers.values():
        fn()
    times = {name: [] for name in timers}
    rates = {name: [] for name in timers}
    for _ in range(repeats):
        for name, fn in timers.items():
            t = time.perf_counter()
            n = fn()
            dt = time.perf_counter() - t
            times[name].append(dt)
            rates[name].append(n / dt)
    return {n: (statistics.median(times[n]), statistics.median(rates[n])) for n in timers}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--num_prompts", type=int, default=4, help="train step: prompts per step")
    p.add_argument("--group_size", type=int, default=8, help="train step: samples per prompt")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--response_len", type=int, default=64, help="train step: response tokens")
    p.add_argument("--batch", type=int, default=8, help="decode: prompts")
    p.add_argument("--new", type=int, default=64, help="decode: new tokens")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--torch_threads", type=int, default=0, help="0 = one per core")
    p.add_argument(
        "--repeat_prompts",
        action="store_true",
        help="ablation: jaxtrace train rows each carry a copy of their prompt (no prompt sharing)",
    )
    p.add_argument(
        "--engine",
        choices=("static", "continuous"),
        default="continuous",
        help="jaxtrace's rollout engine (rollout.engine)",
    )
    p.add_argument("--skip", default="", help="comma-separated rows to skip: tunix,transformers")
    a = p.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    shape = shape_from_args(a)

    tunix = None
    if "tunix" not in skip:
        try:
            from peers import tunix_grpo as tunix  # noqa: PLC0415
        except ImportError as e:
            print(f"tunix rows skipped: {e} (run `make bench-peers`)")

    ours_train, ours_full, ours_decode = jaxtrace_timers(shape, a)
    kw = dict(
        num_prompts=a.num_prompts,
        group_size=a.group_size,
        prompt_len=a.prompt_len,
        response_len=a.response_len,
    )
    rows = []  # (benchmark, implementation, median s, tokens/s)

    def add(bench, timers):
        for name, (med, rate) in measure(timers, a.repeats).items():
            rows.append((bench, name, med, rate))
            print(f"  {bench:<28}{name:<24}{med:>9.3f} s{rate:>12.1f} tok/s", flush=True)

    print("timing (medians of --repeats interleaved rounds, after one warm-up):", flush=True)
    train = {"jaxtrace": ours_train}
    full = {"jaxtrace": ours_full}
    decode = {"jaxtrace": ours_decode}
    if tunix:
        train["tunix GRPOLearner"] = tunix.train_step_timer(shape, **kw)
        full["tunix GRPOLearner"] = tunix.full_step_timer(shape, **kw)
        decode["tunix Sampler"] = tunix.decode_timer(
            shape, batch=a.batch, prompt_len=a.prompt_len, new_tokens=a.new
        )
    if "transformers" not in skip:
        decode["transformers.generate"] = transformers_decode_timer(shape, a)
    add("train step (no rollout)", train)
    add("train step (with rollout)", full)
    add("decode", decode)

    print()
    print(
        f"Qwen3 {a.layers} layers, d={a.hidden}, heads {a.heads}/{a.kv_heads}, "
        f"vocab {a.vocab}, fp32; train: {a.num_prompts} prompts x {a.group_size} samples, "
        f"prompt {a.prompt_len} + response {a.response_len}; decode: batch {a.batch}, "
        f"prompt {a.prompt_len}, {a.new} new; jaxtrace engine {a.engine}; "
        f"backend {jax.default_backend()}, "
        f"jax {jax.__version__}, {os.cpu_count()} CPUs, {a.repeats} repeats"
    )
    print()
    print("| benchmark | implementation | median s | tokens/s | jaxtrace / this |")
    print("|---|---|---|---|---|")
    ours = {bench: rate for bench, name, _, rate in rows if name == "jaxtrace"}
    for bench, name, med, rate in rows:
        print(f"| {bench} | {name} | {med:.3f} | {rate:,.1f} | {ours[bench] / rate:.2f}x |")


if __name__ == "__main__":
    main()
