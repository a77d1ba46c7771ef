"""Held-out accuracy with the rollout engine: pass@1 (greedy) and avg@k / pass@k (sampled)."""

from __future__ import annotations

import jax
import numpy as np

from jaxtrace import sharding
from jaxtrace.rollout import SamplingConfig, engine

_GENERATORS: dict = {}


def _generator(graphdef, params, cfg, engine_name, decode_slots, cache_budget_gib, dp):
    """One sampler per (model graph, sampling config, engine): evaluating twice compiles once.
    The engine's slot cache splits its KV heads as `params` do (`engine.kv_head_shards`)."""
    model_cfg = engine.model_config_of(graphdef, params)
    heads = engine.kv_head_shards(params, model_cfg)
    key = (graphdef, cfg, engine_name, decode_slots, cache_budget_gib, dp, heads)
    if key not in _GENERATORS:
        _GENERATORS[key] = engine.select(
            graphdef, cfg, model_cfg, engine_name, decode_slots, cache_budget_gib, dp, heads
        )
    return _GENERATORS[key]


def sampling_config(max_prompt_len, max_new_tokens, num_samples, temperature, eos_id, pad_id):
    """Held-out decoding: greedy (one sample) at temperature 0, else `num_samples` samples."""
    greedy = temperature <= 0
    return SamplingConfig(
        max_prompt_len=max_prompt_len,
        max_new_tokens=max_new_tokens,
        temperature=1.0 if greedy else temperature,
        greedy=greedy,
        num_samples=1 if greedy else num_samples,
        stop_tokens=(eos_id,),
        pad_id=pad_id,
    )


def batch_rows(batch_size, num_examples=None, mesh=None):
    """Prompts per sampler call: at most the examples, rounded up to the mesh's data axes."""
    rows = max(1, batch_size if num_examples is None else min(batch_size, num_examples))
    if mesh is not None:
        dp = sharding.data_parallel_size(mesh)
        rows = -(-rows // dp) * dp
    return rows


def evaluate(
    graphdef,
    params,
    examples,
    *,
    tokenizer,
    encoder,
    verifier,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    show_progress: bool = False,
    desc: str = "eval",
    mesh=None,
    engine_name: str = "continuous",
    decode_slots: int = 0,
    cache_budget_gib: float = 0.0,
):
    """Returns {"pass@1" or "avg@k", "pass@k", "n", "response_length"} over `examples`.

    With temperature 0 decoding is greedy and `num_samples` is forced to 1. The batch has a
    fixed size (the last one padded), so the sampler compiles once. With `mesh`, each batch is
    split over its data axes (the batch size rounded up to a multiple of them). `engine_name`,
    `decode_slots`, `cache_budget_gib`: the rollout engine and the rows it decodes at once
    (`jaxtrace.rollout.select`). `params` as the sampler takes them (the trainer passes its
    decode-layout copy, `rollout.layout`).
    """
    from jaxtrace.metrics import progress  # noqa: PLC0415

    if not examples:
        return {"n": 0}
    cfg = sampling_config(
        encoder.p, max_new_tokens, num_samples, temperature, tokenizer.eos_id, tokenizer.pad_id
    )
    k = cfg.num_samples
    dp = 1 if mesh is None else sharding.data_parallel_size(mesh)
    generate = _generator(graphdef, params, cfg, engine_name, decode_slots, cache_budget_gib, dp)
    batch_size = batch_rows(batch_size, len(examples), mesh)
    correct = np.zeros((len(examples), k), np.float32)
    lengths = []
    bar = progress(len(examples), desc, enabled=show_progress)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        prompt, valid = encoder.student(padded)
        prompt, valid = sharding.shard_rows((prompt, valid), mesh)
        with sharding.mesh_context(mesh):  # Pallas ops in the model run under shard_map
            out = generate(params, prompt, valid, jax.random.key(seed + start), None)
        out = sharding.to_host(out)
        texts = [tokenizer.decode(r[m]) for r, m in zip(out["response"], out["response_mask"])]
        golds = [e.answer for e in padded for _ in range(k)]
        rewards, _ = verifier.score(texts, golds)
        rewards = rewards.reshape(batch_size, k)[: len(chunk)]
        correct[start : start + len(chunk)] = rewards
        lengths.append(out["length"].reshape(batch_size, k)[: len(chunk)].mean())
        bar.update(len(chunk))
    bar.close()
    name = "pass@1" if k == 1 else f"avg@{k}"
    return {
        name: float(correct.mean()),
        f"pass@{k}": float((correct.max(1) > 0).mean()),
        "n": len(examples),
        "response_length": float(np.mean(lengths)),
    }
