"""Batched sampler: one prefill over left-padded prompts (once per prompt, shared by its
samples), then KV-cached decode steps.

Shapes are fixed by (batch, max_prompt_len, max_new_tokens), so `generate` compiles once per
config. Rows stop independently at their stop tokens or their own length budget; the loop exits
early when every row is done.

Slot layout of the cache: slots [0, P) hold the left-padded prompt, slot P + t holds the t-th
generated token. RoPE positions count only real tokens, so padding never shifts a row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrace.models import (
    decode_loop_layout,
    decode_mask,
    init_cache,
    positions_from_valid,
    prefill_mask,
    repeat_cache_rows,
)

SAMPLE_BLOCK = 512  # vocabulary block of `sample_categorical`


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_prompt_len: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    num_samples: int = 1  # responses per prompt (the GRPO group size)
    stop_tokens: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.max_prompt_len < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingConfig: max_prompt_len={self.max_prompt_len} and "
                f"max_new_tokens={self.max_new_tokens} must be >= 1"
            )
        if not self.greedy and self.temperature <= 0:
            raise ValueError(
                f"SamplingConfig.temperature={self.temperature} must be > 0 "
                "(use greedy=True for argmax decoding)"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p={self.top_p} must be in (0, 1]")
        if self.num_samples < 1:
            raise ValueError(f"SamplingConfig.num_samples={self.num_samples} must be >= 1")


def left_pad(prompts: Sequence[Sequence[int]], max_len: int, pad_id: int = 0):
    """Host-side: token lists -> (tokens [B, max_len] int32, valid [B, max_len] bool)."""
    tokens = np.full((len(prompts), max_len), pad_id, np.int32)
    valid = np.zeros((len(prompts), max_len), bool)
    for i, p in enumerate(prompts):
        if len(p) > max_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than max_prompt_len={max_len}")
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        tokens[i, max_len - len(p) :] = p
        valid[i, max_len - len(p) :] = True
    return tokens, valid


def _top_p_filter(logits_BxV, top_p: float):
    """Masks the tail of the distribution outside the smallest set with mass >= top_p."""
    sorted_logits = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p  # always keeps the top token
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BxV >= threshold, logits_BxV, -jnp.inf)


def _first_above(cdf_BxN, u_Bx1):
    """Per row, the first index whose CDF exceeds u, never past the last index that has mass
    (u can round up to the total)."""
    index = jnp.sum(cdf_BxN <= u_Bx1, axis=-1)
    last_with_mass = jnp.argmax(cdf_BxN >= cdf_BxN[:, -1:], axis=-1)
    return jnp.minimum(index, last_with_mass)


def sample_categorical(rng, logits_BxV, block: int = SAMPLE_BLOCK):
    """One token per row from softmax(logits) (-inf = never), by inverting the CDF in two
    levels: a block of `block` vocabulary entries, then a token in it, one uniform each.

    `jax.random.categorical` (the Gumbel trick) draws a random number per vocabulary entry,
    which took about a quarter of a CPU decode step here. A one-level float32 CDF over Qwen3's
    152k entries is off by ~1e-3 in total variation (tail tokens vanish when added to a total
    near 1); with blocks the error is ~5e-6, the order of float32 uniforms' own resolution.
    """
    b, v = logits_BxV.shape
    block = min(block, v)
    x = jnp.pad(logits_BxV, ((0, 0), (0, -v % block)), constant_values=-jnp.inf)
    top = jnp.max(logits_BxV, axis=-1)[:, None, None]
    inner = jnp.cumsum(jnp.exp(x.reshape(b, -1, block) - top), axis=-1)  # [B, blocks, block]
    outer = jnp.cumsum(inner[:, :, -1], axis=-1)  # [B, blocks]
    u_block, u_token = jax.random.uniform(rng, (2, b, 1), jnp.float32)
    chosen = _first_above(outer, u_block * outer[:, -1:])
    cdf = jnp.take_along_axis(inner, chosen[:, None, None], axis=1)[:, 0]  # [B, block]
    return chosen * block + _first_above(cdf, u_token * cdf[:, -1:])


def _choose(logits_BxV, rng, cfg: SamplingConfig):
    """(token [B], log-prob of it under the model's own distribution [B])."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if cfg.greedy:
        token = jnp.argmax(logits_BxV, axis=-1)
    else:
        scaled = logits_BxV / cfg.temperature
        if cfg.top_p < 1.0:
            scaled = _top_p_filter(scaled, cfg.top_p)
        token = sample_categorical(rng, scaled)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, -1), token[:, None], -1)[:, 0]
    return token.astype(jnp.int32), logp


def generate(
    graphdef, params, prompt_BxP, prompt_valid_BxP, rng, cfg: SamplingConfig, max_new_B=None
):
    """Samples `cfg.num_samples` responses per prompt (rows repeat prompt-major: row i * n + j is
    sample j of prompt i). Jit with `graphdef` and `cfg` static. `max_new_B` caps the response
    length per prompt [B] or per row [R].

    Returns a dict of arrays with R = B * num_samples rows and N = max_new_tokens:
      prompt [R, P], prompt_valid [R, P], response [R, N] (pad after the end),
      response_mask [R, N] (generated tokens, the stop token included), logprobs [R, N]
      (log p of each sampled token under temperature-1 logits; 0 where masked),
      length [R], stopped [R] (ended on a stop token rather than the budget).
    """
    n, p, new = cfg.num_samples, prompt_BxP.shape[1], cfg.max_new_tokens
    if prompt_BxP.shape[1] != cfg.max_prompt_len:
        raise ValueError(
            f"prompt width {prompt_BxP.shape[1]} != max_prompt_len {cfg.max_prompt_len}"
        )
    prompt = jnp.repeat(prompt_BxP, n, axis=0)
    valid = jnp.repeat(prompt_valid_BxP, n, axis=0)
    r, s = prompt.shape[0], p + new
    if max_new_B is None:
        budget = jnp.full((r,), new, jnp.int32)
    else:  # per prompt [B] (repeated over its samples) or per row [R]
        budget = jnp.minimum(max_new_B, new).astype(jnp.int32)
        budget = budget if budget.shape == (r,) else jnp.repeat(budget, n)
    model = nnx.merge(graphdef, params)
    stop = jnp.asarray(cfg.stop_tokens or (-1,), jnp.int32)

    kv_valid = jnp.concatenate([valid, jnp.ones((r, new), bool)], axis=1)  # [R, S]
    # One prefill per prompt; its cache and last hidden state are copied to its n samples.
    b = prompt_BxP.shape[0]
    cache = init_cache(model.cfg, b, s)
    hidden, cache = model(
        prompt_BxP,
        positions_from_valid(prompt_valid_BxP),
        prefill_mask(prompt_valid_BxP, s),
        cache,
        0,
    )
    hidden = hidden[:, -1:]
    if n > 1:
        hidden, cache = jnp.repeat(hidden, n, axis=0), repeat_cache_rows(cache, n)
    rng, step_rng = jax.random.split(rng)
    token, logp = _choose(model.logits(hidden)[:, 0], step_rng, cfg)
    num_prompt = valid.sum(axis=1).astype(jnp.int32)

    response = jnp.full((r, new), cfg.pad_id, jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((r, new), jnp.float32).at[:, 0].set(logp)
    mask = jnp.zeros((r, new), bool).at[:, 0].set(budget > 0)
    done = jnp.isin(token, stop) | (budget <= 1)
    layers, cache = decode_loop_layout(model, cache)  # per-layer buffers on CPU

    def cond(carry):
        t, _, _, _, _, done, _, _ = carry
        return (t < new) & ~jnp.all(done)

    def body(carry):
        t, token, cache, response, logprobs, done, mask, rng = carry
        slot = p + t - 1  # the slot of the last sampled token, fed back in
        step_mask = decode_mask(kv_valid, slot)
        positions = (num_prompt + t - 1)[:, None]
        hidden, cache = model(token[:, None], positions, step_mask, cache, slot, layers=layers)
        rng, step_rng = jax.random.split(rng)
        nxt, lp = _choose(model.logits(hidden)[:, 0], step_rng, cfg)
        live = ~done
        nxt = jnp.where(live, nxt, cfg.pad_id)
        response = response.at[:, t].set(nxt)
        logprobs = logprobs.at[:, t].set(jnp.where(live, lp, 0.0))
        mask = mask.at[:, t].set(live)
        done = done | jnp.isin(nxt, stop) | (t + 1 >= budget)
        return t + 1, nxt, cache, response, logprobs, done, mask, rng

    carry = (jnp.int32(1), token, cache, response, logprobs, done, mask, rng)
    _, _, _, response, logprobs, _, mask, _ = jax.lax.while_loop(cond, body, carry)
    response = jnp.where(mask, response, cfg.pad_id)
    logprobs = jnp.where(mask, logprobs, 0.0)
    length = mask.sum(axis=1).astype(jnp.int32)
    last = jnp.take_along_axis(response, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]
    stopped = (length > 0) & jnp.isin(last, stop)
    return {
        "prompt": prompt,
        "prompt_valid": valid,
        "response": response,
        "response_mask": mask,
        "logprobs": logprobs,
        "length": length,
        "stopped": stopped,
    }


def make_generate(graphdef, cfg: SamplingConfig, max_rows: int = 0):
    """A jitted `(params, prompt, prompt_valid, rng, max_new_B=None) -> rollout dict`.

    max_rows > 0 bounds the rows generated at once (the KV cache holds max_rows x (P + N) slots,
    `layout.slots_for_budget`): the prompts go in chunks of max(1, max_rows // num_samples)
    (rounded down to a multiple of the rows' data-parallel split when it allows), each with the
    key fold_in(rng, chunk index), the outputs concatenated. Greedy output does not depend on the
    chunks; sampled output is another draw from the same distribution."""

    @jax.jit
    def run(params, prompt_BxP, prompt_valid_BxP, rng, max_new_B=None):
        return generate(graphdef, params, prompt_BxP, prompt_valid_BxP, rng, cfg, max_new_B)

    if max_rows <= 0:
        return run

    def chunked(params, prompt_BxP, prompt_valid_BxP, rng, max_new_B=None):
        b, n = np.shape(prompt_BxP)[0], cfg.num_samples
        per = chunk_prompts(max_rows, n, _row_split(prompt_BxP))
        if b <= per:
            return run(params, prompt_BxP, prompt_valid_BxP, rng, max_new_B)
        outs = []
        for i, start in enumerate(range(0, b, per)):
            rows = slice(start, min(start + per, b))
            limit = None
            if max_new_B is not None:  # per prompt [B] or per row [B * n]
                limit = jnp.asarray(max_new_B)
                per_row = limit.shape[0] != b
                limit = limit[rows.start * n : rows.stop * n] if per_row else limit[rows]
            p, v = (_rows_like(x, rows) for x in (prompt_BxP, prompt_valid_BxP))
            outs.append(run(params, p, v, jax.random.fold_in(rng, i), limit))
        return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *outs)

    chunked.max_rows = max_rows
    return chunked


def chunk_prompts(max_rows: int, num_samples: int, split: int = 1) -> int:
    """Prompts per chunk of the row-chunked sampler: max(1, max_rows // num_samples), rounded
    down to a multiple of `split` (the data-parallel split of the rows) when at least one."""
    per = max(1, max_rows // num_samples)
    return per // split * split if per >= split else per


def _row_split(x) -> int:
    """How many ways x's leading axis is split (1 for host arrays)."""
    spec = getattr(getattr(x, "sharding", None), "spec", None)
    if not spec or spec[0] is None:
        return 1
    mesh = x.sharding.mesh
    axes = (spec[0],) if isinstance(spec[0], str) else spec[0]
    return int(np.prod([mesh.shape[a] for a in axes]))


def _rows_like(x, rows: slice):
    """Rows of x, placed as x is when the rows still split evenly (a slice of a split array
    otherwise lands wherever XLA puts it)."""
    part = x[rows]
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and part.shape[0] % _row_split(x) == 0:
        return jax.device_put(part, sharding)
    return part
