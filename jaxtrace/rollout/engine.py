"""Continuous-batching rollout engine: decode cost follows the tokens actually generated.

Same API and outputs as `sampler.make_generate` (a drop-in, `rollout.engine="continuous"`), but:

- **Length-bucketed dense cache.** Decode slots hold a dense KV cache, head-major
  [slots, Hkv, L, Dh] in the model's order (token-major [slots, L, Hkv, Dh] between segments on
  TPU, `slots_token_major`), with L = P + a response-length bucket (`min_bucket` * 2^k, capped
  at the budget) that covers the longest live row. A decode step attends over those L slots
  only, and the cache is grown (padded) between segments when a row reaches the end of its
  bucket. So a step costs O(current length), not O(P + budget), and the cache memory is slots x
  L, not rows x (P+N).
- **Continuous batching.** A fixed number of decode slots (`num_slots`, default one per row, at
  most `max_slots`: the cache budget's count, `layout.slots_for_budget`). The host runs jitted
  *segments* of decode steps (a `while_loop` that exits when a slot frees up while samples
  wait, when a row needs a bigger bucket, or when 3/4 of the slots went idle);
  between segments it hands free slots to waiting samples and, once no sample waits, compacts
  the live rows into a smaller power-of-two slot batch. Rows of a GRPO group do
  not decode in lockstep.
- **Shared prompt prefix.** Every prompt is prefilled once (batched, [prompts, P]); a slot that
  takes a sample copies its prompt's KV into its first P cache slots inside the segment. On a
  mesh the prefix is split over the batch axes like the slots, and the host hands a chip's free
  slots only samples whose prompt that chip holds, so the copy is chip-local (`take_prompts`).
- **Per-row randomness.** Row r's t-th token draws from fold_in(fold_in(rng, r), t), so the
  output does not depend on the slot count, the buckets or the schedule (tests check this). The
  draws differ from the static sampler's (one key per step for the whole batch), the
  distribution does not.

Why dense buckets rather than a paged cache: on CPU (and for XLA in general) a gather-based paged
attention re-reads the page table and gathers pages every step, and XLA has no ragged attention;
bucketed dense prefixes need no new attention kernel (only a per-row cache write,
`qwen3.write_rows`), compile once per (slot bucket, length bucket) pair visited - O(log) of each -
and keep attention exactly the model's `attention`, so greedy decoding equals the
static sampler's token for token. The cost is up to 2x of attention over the true length inside a
bucket and a cache copy when a bucket grows (also O(log N) times).

Not built: a paged path on TPU with jax's `pallas.ops.tpu.paged_attention` (decode: q [B, Hq, Dh],
head-major pages [Hkv, pages, page_size, Dh] per layer, `lengths` [B], `page_indices` [B, pages
per row]; `ragged_paged_attention` also takes prefill chunks but interleaves K and V as [pages,
page_size, 2 Hkv, Dh]). What it needs: (1) no mask argument - a row attends to positions
[0, length) of its pages - so prompts stored packed (real tokens from slot 0, not left-padded;
RoPE positions already count only real tokens); (2) a page pool per layer sized by the cache
budget, a host free list handing pages out between segments (a segment reserving the pages its
steps can reach) and a page table per slot; a group's full prompt pages shared by index, its
last partial page copied per row; (3) the per-step K/V write as an XLA scatter into (page,
offset) (the kernel only reads); (4) `shard_map` over the batch axes (Mosaic kernels are not
partitioned by XLA), each shard with its own pool, as `pallas_kernels._mesh` does; (5) its
constraints: pages per row divisible by `pages_per_compute_block`, int32 lengths, megacore mode
on v4 / v5p. CPU / GPU keep the dense buckets (a gather-based paged attention is slower there).
The gain: memory follows the pages in use (no bucket slack, no copy when a row outgrows one).

Placement: the engine takes params already placed; the callers reshard them from the training
(FSDP) layout to the decode layout once per RL step (`rollout.layout`). On a mesh the slot arrays
are split over its batch axes (when the slot count divides), so the data axes decode different
rows and a chip holds slots / d of the cache (unsplit, every chip would decode every slot); the
attention caches' KV heads are split as the params split them (`cache_sharding`: over "tensor"
in the tensor layout), so a chip holds only the heads its attention computes, and the cache
budget counts slots / d x 1 / h of a slot's cache per chip (`select(head_shards=)`).
`Engine.program_shapes(rows)` lists every (slots, cache length) segment shape a call may compile,
for an ahead-of-time compile and its HBM count.

Hybrid (linear-attention) layers keep their constant-size per-row state: a slot copies its
prompt's state, compaction gathers it, growing the cache leaves it alone. Dropless MoE decodes
per token, as dense layers. Unsupported (a ValueError naming the reason; `select`, which the
callers use, falls back to the static sampler): MoE with a capacity factor (token dropping makes a
row's output depend on the rows sharing its step).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrace.models import (
    causal_mask,
    decode_loop_layout,
    decode_mask,
    init_cache,
    is_kv,
    pad_cache_slots,
    positions_from_valid,
    stack_cache,
    take_cache_rows,
)
from jaxtrace.models.qwen3 import CACHE_ROW_AXIS
from jaxtrace.rollout import layout
from jaxtrace.rollout.sampler import SamplingConfig, _top_p_filter, sample_categorical

log = logging.getLogger(__name__)

ENGINES = ("continuous", "static")


def check_supported(model_cfg) -> None:
    """ValueError if the continuous engine cannot decode this model (see the module docstring)."""
    if model_cfg.family == "qwen3_moe" and model_cfg.moe_capacity_factor:
        raise ValueError(
            f"rollout engine 'continuous' does not support moe_capacity_factor="
            f"{model_cfg.moe_capacity_factor} (dropped tokens depend on the rows sharing a step); "
            "use a dropless MoE (0) or rollout.engine='static'"
        )


def model_config_of(graphdef, params):
    """The ModelConfig of a (graphdef, params) pair, from shapes only."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    return nnx.merge(graphdef, abstract).cfg


def bucket(t: int, limit: int, min_bucket: int) -> int:
    """The smallest min_bucket * 2^k >= t, capped at `limit`."""
    b = min_bucket
    while b < t:
        b *= 2
    return min(b, limit)


def _pow2_at_least(n: int, cap: int) -> int:
    return min(1 << max(n - 1, 0).bit_length(), cap)


def _choose_rows(logits_RxV, keys_R, cfg: SamplingConfig):
    """Per-row keys: (token [R], log-prob under the temperature-1 logits [R])."""
    logits_RxV = logits_RxV.astype(jnp.float32)
    if cfg.greedy:
        token = jnp.argmax(logits_RxV, axis=-1)
    else:
        scaled = logits_RxV / cfg.temperature
        if cfg.top_p < 1.0:
            scaled = _top_p_filter(scaled, cfg.top_p)
        token = jax.vmap(lambda k, x: sample_categorical(k, x[None])[0])(keys_R, scaled)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits_RxV, -1), token[:, None], -1)[:, 0]
    return token.astype(jnp.int32), logp


def _step_keys(row_keys_R, t_R):
    return jax.vmap(jax.random.fold_in)(row_keys_R, t_R)


def _budget(max_new_B, b: int, cfg: SamplingConfig):
    """Per-row budgets [R] from None, per-prompt [B] or per-row [B * n] limits."""
    r = b * cfg.num_samples
    if max_new_B is None:
        return jnp.full((r,), cfg.max_new_tokens, jnp.int32)
    limit = jnp.minimum(jnp.asarray(max_new_B), cfg.max_new_tokens).astype(jnp.int32)
    if limit.shape == (r,):
        return limit
    if limit.shape != (b,):
        raise ValueError(f"max_new_B has shape {limit.shape}; want ({b},) per prompt or ({r},)")
    return jnp.repeat(limit, cfg.num_samples)


def _prefill(
    graphdef,
    cfg: SamplingConfig,
    params,
    prompt_BxP,
    valid_BxP,
    rng,
    budget_R,
    first_row=0,
    *,
    prefix_sharding=None,
):
    """Each prompt once: its KV per layer, in the slot cache's stored order (`_stored`: [B,
    Hkv, P, Dh], token-major [B, P, Hkv, Dh] on TPU), and every row's first token. Row i is row
    `first_row + i` of the call (a pass of the engine), whose key it takes. prefix_sharding:
    the prefix cache's placement (`cache_sharding`, one per entry), or None (XLA's choice)."""
    model = nnx.merge(graphdef, params)
    b, p = prompt_BxP.shape
    cache = init_cache(model.cfg, b, p)
    hidden, cache = model(
        prompt_BxP, positions_from_valid(valid_BxP), causal_mask(valid_BxP), cache, 0
    )
    cache = _stored(cache)
    if prefix_sharding is not None:
        cache = [jax.lax.with_sharding_constraint(c, s) for c, s in zip(cache, prefix_sharding)]
    logits = jnp.repeat(model.logits(hidden[:, -1:])[:, 0], cfg.num_samples, axis=0)
    r = logits.shape[0]
    row_keys = jax.vmap(lambda i: jax.random.fold_in(rng, first_row + i))(jnp.arange(r))
    token, logp = _choose_rows(logits, _step_keys(row_keys, jnp.zeros((r,), jnp.int32)), cfg)
    stop = jnp.asarray(cfg.stop_tokens or (-1,), jnp.int32)
    new = cfg.max_new_tokens
    outputs = {
        "response": jnp.full((r, new), cfg.pad_id, jnp.int32).at[:, 0].set(token),
        "logprobs": jnp.zeros((r, new), jnp.float32).at[:, 0].set(logp),
        "length": (budget_R > 0).astype(jnp.int32),
    }
    done = jnp.isin(token, stop) | (budget_R <= 1)
    return cache, token, row_keys, outputs, done


def slots_token_major() -> bool:
    """Whether the slot cache is stored token-major between segments, attention leaves
    [layers, slots, length, Hkv, Dh], rather than the model's head-major [layers, slots, Hkv,
    length, Dh]: on TPU (`_mesh.target_platform`). XLA:TPU lays a decode loop's cache out
    token-major (a step writes one token's [Hkv, Dh] tile), so a head-major argument cost a
    copy of the whole cache into that layout at every segment (AOT, the 1.7B rollout decode on
    v5p-8: 9.3 of its 16.0 GiB of temporaries). Stored token-major, the segment's swap to the
    model's order is a layout change that XLA folds away. CPU keeps head-major, the order its
    dots read without a copy (`README`, vs_peers); GPU too (not measured)."""
    from pallas_kernels import _mesh  # noqa: PLC0415

    return _mesh.target_platform() == "tpu"


def _swap_kv(cache):
    """Head-major <-> token-major attention leaves (axes 2 and 3; its own inverse); hybrid
    layers' states unchanged."""
    return [{n: jnp.swapaxes(x, 2, 3) for n, x in c.items()} if is_kv(c) else c for c in cache]


def _stored(cache):
    """The model's cache -> the slot cache as stored between segments (`slots_token_major`)."""
    return _swap_kv(cache) if slots_token_major() else cache


_model_order = _stored  # the stored slot cache -> the model's order (the same swap)


def _empty_slots(model_cfg, slots: int, length: int):
    return {
        "cache": _stored(init_cache(model_cfg, slots, length)),
        "t": jnp.ones((slots,), jnp.int32),
        "token": jnp.zeros((slots,), jnp.int32),
        "done": jnp.ones((slots,), bool),
    }


def take_prompts(prefix, src_S, placement=None):
    """`prefix[:, src_S]`: each slot's prompt entry from a prefix leaf [layers, prompts, ...].

    placement: the prefix's NamedSharding (`prompt_runs`), its prompt axis split over the mesh's
    batch axes like the slots; each chip's slots then take only prompts that chip holds (the
    engine's host loop hands rows out so), and the copy runs per chip under `shard_map` on
    local indices. A gather with indices XLA cannot see are local would all-gather every prompt's
    prefix onto every chip (AOT, 1.7B self-annotation on v6e-8: 7.9 GiB a chip). None: the
    plain gather."""
    if placement is None:
        return prefix[:, src_S]
    spec = placement.spec
    take = lambda pre, src: pre[:, src % pre.shape[1]]  # noqa: E731 (src: this chip's prompts)
    rows = jax.sharding.PartitionSpec(spec[1])
    return jax.shard_map(
        take, mesh=placement.mesh, in_specs=(spec, rows), out_specs=spec, check_vma=False
    )(prefix, src_S)


def _segment(
    graphdef,
    cfg: SamplingConfig,
    params,
    slots,
    outputs,
    prefix,
    valid_BxP,
    token0_R,
    row_keys_R,
    budget_R,
    slot_row_S,
    fresh_S,
    min_active,
    *,
    length: int,
    prefix_sharding=None,
):
    """Decode steps until fewer than `min_active` slots are live, no slot is live, or a live row
    would write past the cache's `length` slots. Fresh slots first take their row's prompt KV
    (hybrid layers: their prompt's state) and first token. slot_row_S: the row each slot decodes
    (-1 = empty). prefix_sharding: the prefix's placement when each chip's slots take only
    the prompts that chip holds (`prompt_runs`, `take_prompts`), else None."""
    model = nnx.merge(graphdef, params)
    n, p, stop = cfg.num_samples, valid_BxP.shape[1], jnp.asarray(cfg.stop_tokens or (-1,))
    r = token0_R.shape[0]
    occupied = slot_row_S >= 0
    row = jnp.maximum(slot_row_S, 0)
    src = row // n  # the slot's prompt

    # Cache leaves are [layers, slots, ...] (`init_cache`); the prefix's [layers, prompts, ...].
    # The prompt copy runs in the stored order (`_stored`): in the model's it would cost XLA:TPU
    # a copy of the whole cache into a head-major layout and back (AOT, 1.7B self-annotation
    # on v5p-8: 3.6 GiB).
    token_axis = 2 if slots_token_major() else 3

    def take_prompt(c, pre, placed):
        fresh = fresh_S[None, :, None, None, None]
        old = jax.lax.slice_in_dim(c, 0, p, axis=token_axis)
        head = jnp.where(fresh, take_prompts(pre, src, placed).astype(c.dtype), old)
        return jax.lax.dynamic_update_slice(c, head, (0, 0, 0, 0, 0))

    def take_state(c, pre, placed):  # a hybrid layer's constant-size state, one per row
        pick = lambda x, y: jnp.where(  # noqa: E731
            fresh_S.reshape((1, -1) + (1,) * (x.ndim - 2)),
            take_prompts(y, src, placed).astype(x.dtype),
            x,
        )
        return jax.tree.map(pick, c, pre)

    placements = prefix_sharding or (None,) * len(prefix)
    cache = _model_order(
        [
            {k: take_prompt(c[k], pre[k], placed) for k in c}
            if is_kv(c)
            else take_state(c, pre, placed)
            for c, pre, placed in zip(slots["cache"], prefix, placements)
        ]
    )
    t = jnp.where(fresh_S, 1, slots["t"])
    token = jnp.where(fresh_S, token0_R[row], slots["token"])
    done = jnp.where(fresh_S, False, slots["done"]) | ~occupied
    prompt_valid = valid_BxP[src]  # [S, P]
    num_prompt = prompt_valid.sum(axis=1).astype(jnp.int32)
    kv_valid = jnp.concatenate([prompt_valid, jnp.ones((row.shape[0], length - p), bool)], 1)
    keys, budget = row_keys_R[row], budget_R[row]
    layers, cache = decode_loop_layout(model, cache)  # per-layer buffers on CPU

    def cond(c):
        _, t, _, done, _ = c
        live = ~done
        fits = jnp.all(done | (p + t <= length))
        return (jnp.sum(live) >= jnp.maximum(min_active, 1)) & fits

    def body(c):
        cache, t, token, done, out = c
        write = p + t - 1  # the slot of the last sampled token, fed back in
        mask = decode_mask(kv_valid, write)
        at = jnp.where(done, length, write)  # idle slots write nothing
        positions = (num_prompt + t - 1)[:, None]
        hidden, cache = model(token[:, None], positions, mask, cache, at, layers=layers)
        nxt, lp = _choose_rows(model.logits(hidden)[:, 0], _step_keys(keys, t), cfg)
        live = ~done
        dest = jnp.where(live, row, r)  # idle slots write nowhere
        out = {
            "response": out["response"].at[dest, t].set(nxt, mode="drop"),
            "logprobs": out["logprobs"].at[dest, t].set(lp, mode="drop"),
            "length": out["length"].at[dest].set(t + 1, mode="drop"),
        }
        done = done | jnp.isin(nxt, stop) | (t + 1 >= budget)
        return cache, t + live, jnp.where(live, nxt, token), done, out

    cache, t, token, done, outputs = jax.lax.while_loop(
        cond, body, (cache, t, token, done, outputs)
    )
    if layers is not None:
        cache = stack_cache(model.cfg, cache)
    return {"cache": _stored(cache), "t": t, "token": token, "done": done}, outputs


def _grow(slots, length: int):
    return dict(slots, cache=_stored(pad_cache_slots(_model_order(slots["cache"]), length)))


def _compact(slots, idx_S):
    rest = jax.tree.map(lambda x: x[idx_S], {k: v for k, v in slots.items() if k != "cache"})
    return dict(rest, cache=take_cache_rows(slots["cache"], idx_S))


def _finish(cfg: SamplingConfig, prompt_BxP, valid_BxP, outputs):
    n, new = cfg.num_samples, cfg.max_new_tokens
    stop = jnp.asarray(cfg.stop_tokens or (-1,), jnp.int32)
    length = outputs["length"]
    mask = jnp.arange(new)[None] < length[:, None]
    response = jnp.where(mask, outputs["response"], cfg.pad_id)
    last = jnp.take_along_axis(response, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]
    return {
        "prompt": jnp.repeat(prompt_BxP, n, axis=0),
        "prompt_valid": jnp.repeat(valid_BxP, n, axis=0),
        "response": response,
        "response_mask": mask,
        "logprobs": jnp.where(mask, outputs["logprobs"], 0.0),
        "length": length,
        "stopped": (length > 0) & jnp.isin(last, stop),
    }


_prefill_jit = jax.jit(_prefill, static_argnums=(0, 1), static_argnames=("prefix_sharding",))
_segment_jit = jax.jit(
    _segment,
    static_argnums=(0, 1),
    static_argnames=("length", "prefix_sharding"),
    donate_argnums=(3, 4),
)
_finish_jit = jax.jit(_finish, static_argnums=0)


@functools.cache
def _placed(kind: str, placement):
    """The slot-batch jits with their outputs on `placement` (`slot_sharding`; None: where XLA
    puts them)."""
    out_sharding = None
    if placement is not None:
        rows, cache = placement
        out_sharding = {"cache": list(cache), "t": rows, "token": rows, "done": rows}
    if kind == "empty":
        return jax.jit(_empty_slots, static_argnums=(0, 1, 2), out_shardings=out_sharding)
    if kind == "grow":
        return jax.jit(_grow, static_argnums=1, out_shardings=out_sharding)
    return jax.jit(_compact, out_shardings=out_sharding)


def _placed_k_proj(params, model_cfg):
    """The first attention layer's k projection [..., embed, kv_heads, dim] (hybrid layers have
    none) when the params are placed on a mesh (its sharding a NamedSharding), else None."""
    for q in range(model_cfg.param_period):
        if not model_cfg.is_hybrid_layer(q):
            k_proj = params["layers"][q]["self_attn"]["k_proj"]
            placed = getattr(k_proj, "sharding", None)
            return k_proj if isinstance(placed, jax.sharding.NamedSharding) else None
    return None


def kv_head_axes(params, model_cfg):
    """The mesh axes the params split the KV heads over (the k projection's kv_heads dim, as
    the decode layout placed it: "tensor" in the tensor layout), or None."""
    k_proj = _placed_k_proj(params, model_cfg)
    if k_proj is None:
        return None
    spec = tuple(k_proj.sharding.spec)
    return (spec + (None,) * (len(k_proj.shape) - len(spec)))[-2]


def kv_head_shards(params, model_cfg) -> int:
    """Chips a slot's KV cache is split over by heads (`kv_head_axes`' size; 1: not split)."""
    from jaxtrace import sharding  # noqa: PLC0415

    k_proj = _placed_k_proj(params, model_cfg)
    if k_proj is None:
        return 1
    return sharding.axes_size(k_proj.sharding.mesh, kv_head_axes(params, model_cfg))


def cache_sharding(mesh, model_cfg, heads=None, token_major: bool = False) -> tuple:
    """Per entry of `init_cache`'s list, the NamedSharding of its leaves [layers, slots, ...]:
    the slot axis (`CACHE_ROW_AXIS`) split over the mesh's batch axes and, for attention layers,
    the KV-head axis over `heads` (`kv_head_axes`): in the tensor layout each chip then holds
    its own heads' cache, which its attention reads, rather than every head's. Hybrid layers'
    states keep only the slot split. token_major: the leaves are the stored slot cache's
    [layers, slots, length, Hkv, Dh] (`slots_token_major`), not the model's head-major order."""
    from jaxtrace import sharding  # noqa: PLC0415

    rows = sharding.batch_sharding(mesh, 1).spec
    lead = [None] * CACHE_ROW_AXIS
    kv = jax.sharding.PartitionSpec(*lead, *rows, *((None, heads) if token_major else (heads,)))
    state = jax.sharding.PartitionSpec(*lead, *rows)
    return tuple(
        jax.sharding.NamedSharding(mesh, state if model_cfg.is_hybrid_layer(q) else kv)
        for q in range(model_cfg.scan_period)
    )


def slot_sharding(params, slots: int, model_cfg):
    """The slot arrays' placement, (per-slot vectors, cache) shardings: their slot axis split over
    the batch axes of the params' mesh when `slots` divides evenly - axis 0 of the per-slot
    vectors, axis 1 (`CACHE_ROW_AXIS`) of the cache, stacked per layer as [layers, slots, ...] -
    and the attention caches' KV heads as the params split them (`cache_sharding`), else None
    (no mesh, or replicated)."""
    from jaxtrace import sharding  # noqa: PLC0415

    placed = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if not isinstance(placed, jax.sharding.NamedSharding):
        return None
    mesh = placed.mesh
    if math.prod(mesh.shape.values()) < 2 or slots % sharding.data_parallel_size(mesh):
        return None
    rows = sharding.batch_sharding(mesh, 1)
    heads = kv_head_axes(params, model_cfg)
    return rows, cache_sharding(mesh, model_cfg, heads, token_major=slots_token_major())


def prompt_runs(params, model_cfg, prompts: int, slots: int):
    """(groups, prefix placement) for an engine pass of `prompts` prompts on `slots` slots:
    when the slot cache is split over the mesh's batch axes (`slot_sharding`) and the prompts
    split evenly over them too, (the batch-parallel size, the prefix split over the batch axes
    and the KV heads as the slot cache is: `cache_sharding`, in the stored order), so each chip's
    slots copy prompts from its own part of the prefix (`take_prompts`); else (1, None)."""
    from jaxtrace import sharding  # noqa: PLC0415

    placed = slot_sharding(params, slots, model_cfg)
    if placed is None:
        return 1, None
    dp = sharding.data_parallel_size(placed[0].mesh)
    if dp < 2 or prompts % dp:
        return 1, None
    return dp, placed[1]  # the slot cache's own placement


def _to_host(x):
    from jaxtrace import sharding  # noqa: PLC0415 (sharding imports the models package)

    return sharding.to_host(x)


class Engine:
    """`Engine(graphdef, cfg)(params, prompt [B, P], prompt_valid [B, P], rng, max_new_B=None)`
    returns the static sampler's rollout dict (R = B * num_samples rows, see
    `sampler.generate`); max_new_B may be per prompt [B] or per row [R].

    num_slots: decode slots (0 = one per row, at most max_slots when that is > 0; fewer than the
    rows bounds the cache memory, samples then wait for a free slot). min_bucket: the smallest
    response-length bucket of the cache. min_slots: the slot batch is never compacted below this
    (smaller batches save little and each size is one more compile).
    `stats` holds the last call's pass and segment counts and the (slots, cache length) shapes
    its segments used.
    """

    def __init__(
        self,
        graphdef,
        cfg: SamplingConfig,
        num_slots: int = 0,
        min_bucket: int = 64,
        min_slots: int = 8,
        max_slots: int = 0,
        max_prompts: int = 0,
    ):
        least = {"num_slots": 0, "max_slots": 0, "max_prompts": 0, "min_bucket": 1, "min_slots": 1}
        given = dict(zip(least, (num_slots, max_slots, max_prompts, min_bucket, min_slots)))
        bad = [f"{k}={given[k]} must be >= {lo}" for k, lo in least.items() if given[k] < lo]
        if bad:
            raise ValueError("Engine: " + ", ".join(bad))
        self.graphdef, self.cfg = graphdef, cfg
        self.num_slots, self.min_bucket, self.min_slots = num_slots, min_bucket, min_slots
        self.max_slots, self.max_prompts = max_slots, max_prompts
        # Module-level jits keyed on (graphdef, cfg): engines of one model share compilations.
        self._prefill = functools.partial(_prefill_jit, graphdef, cfg)
        self._segment = functools.partial(_segment_jit, graphdef, cfg)
        self._finish = functools.partial(_finish_jit, cfg)
        self.stats: dict = {}
        self._model_cfg = None

    def program_shapes(self, rows: int) -> list[tuple[int, int]]:
        """Every (slots, cache length) pair that a call with `rows` rollout rows may compile a
        segment for: what an ahead-of-time compile (and its memory count) has to cover."""
        cap = self.slot_cap(rows)
        slots, k = {cap}, 1
        while k < cap:
            slots.add(min(cap, max(self.min_slots, k)))
            k *= 2
        p, new = self.cfg.max_prompt_len, self.cfg.max_new_tokens
        lengths = {p + bucket(t, new, self.min_bucket) for t in range(1, new + 1)}
        return sorted((s, n) for s in slots for n in lengths)

    def slot_cap(self, rows: int) -> int:
        """The most decode slots a call with `rows` rollout rows uses."""
        if self.num_slots:
            return self.num_slots
        return min(rows, self.max_slots) if self.max_slots else rows

    def prompt_chunk(self, prompts: int) -> int:
        """Prompts prefilled and decoded per pass (`max_prompts`: the prefix cache is held for
        every prompt of a pass until its rows finish)."""
        return min(prompts, self.max_prompts) if self.max_prompts else prompts

    def __call__(self, params, prompt_BxP, prompt_valid_BxP, rng, max_new_B=None):
        b = np.shape(prompt_BxP)[0]
        m = self.prompt_chunk(b)
        self.stats = {"segments": 0, "shapes": [], "prompt_runs": [], "passes": -(-b // m)}
        if m == b:
            return self._call(params, prompt_BxP, prompt_valid_BxP, rng, max_new_B)
        # Passes of m prompts (the last padded with copies of its first prompt at a budget of
        # 0, so every pass has one shape); each row keeps its key, fold_in(rng, row).
        n = self.cfg.num_samples
        budget = np.asarray(_budget(max_new_B, b, self.cfg))
        prompt, valid = np.asarray(prompt_BxP), np.asarray(prompt_valid_BxP)
        parts = []
        for start in range(0, b, m):
            idx = np.arange(start, start + m)
            real = idx < b
            idx = np.where(real, idx, start)
            rows = (idx[:, None] * n + np.arange(n)).reshape(-1)
            row_budget = np.where(np.repeat(real, n), budget[rows], 0).astype(np.int32)
            out = self._call(params, prompt[idx], valid[idx], rng, row_budget, first_row=start * n)
            keep = int(real.sum()) * n
            parts.append(jax.tree.map(lambda x, k=keep: np.asarray(x)[:k], out))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)

    def _call(self, params, prompt_BxP, prompt_valid_BxP, rng, max_new_B=None, first_row=0):
        cfg = self.cfg
        b, p = np.shape(prompt_BxP)
        if p != cfg.max_prompt_len:
            raise ValueError(f"prompt width {p} != max_prompt_len {cfg.max_prompt_len}")
        if self._model_cfg is None:
            self._model_cfg = model_config_of(self.graphdef, params)
            check_supported(self._model_cfg)
        model_cfg = self._model_cfg
        budget = _budget(max_new_B, b, cfg)
        r, new = b * cfg.num_samples, cfg.max_new_tokens
        cap = self.slot_cap(r)
        slot_bucket = lambda k: min(cap, max(self.min_slots, _pow2_at_least(k, cap)))  # noqa: E731
        place_of = lambda n: slot_sharding(params, n, model_cfg)  # noqa: E731
        place = lambda kind, n: _placed(kind, place_of(n))  # noqa: E731
        # Chip-local prompt copies: with the slots split over the mesh's batch axes in `groups`
        # runs, the prefix is split over them too and a slot takes only rows whose prompt is in
        # its run (`take_prompts`). Decided for the first slot batch (the rows wait for it).
        groups, prefix_sharding = prompt_runs(params, model_cfg, b, slot_bucket(r))
        if groups > 1:  # host prompts split as the prefix is (left alone, replicated)
            from jaxtrace import sharding  # noqa: PLC0415

            mesh = prefix_sharding[0].mesh
            prompt_BxP, prompt_valid_BxP = (
                x if isinstance(x, jax.Array) else sharding.shard_rows(x, mesh)
                for x in (prompt_BxP, prompt_valid_BxP)
            )
        prefix, token0, row_keys, outputs, done0 = self._prefill(
            params,
            prompt_BxP,
            prompt_valid_BxP,
            rng,
            budget,
            jnp.int32(first_row),
            prefix_sharding=prefix_sharding,
        )
        waiting = np.flatnonzero(~_to_host(done0))
        run_of = lambda rows: rows // cfg.num_samples // (b // groups)  # noqa: E731 (prompt's run)
        # One queue per run of prompts; pop() takes a run's lowest row first.
        queues = [[int(i) for i in waiting[run_of(waiting) == j]][::-1] for j in range(groups)]
        slots_n = slot_bucket(len(waiting)) if len(waiting) else 0
        # The runs a segment's slot batch gathers prompts in: `groups` while the batch splits
        # into them on the mesh, else 1 (a plain gather: correct wherever the prompts are).
        runs = lambda n: groups if n % groups == 0 and place_of(n) is not None else 1  # noqa: E731
        if slots_n:
            length = p + bucket(1, new, self.min_bucket)
            slots = place("empty", slots_n)(model_cfg, slots_n, length)
            slot_row = np.full(slots_n, -1, np.int32)
            t_host = np.ones(slots_n, np.int32)
            done_host = np.ones(slots_n, bool)
        seg_groups = runs(slots_n) if slots_n else 1
        while any(queues) or (slots_n and not done_host.all()):
            fresh = np.zeros(slots_n, bool)
            for s in range(slots_n):
                queue = queues[s * groups // slots_n]  # slot s's run (fixed while any wait)
                if queue and (slot_row[s] < 0 or done_host[s]):
                    slot_row[s], fresh[s], t_host[s], done_host[s] = queue.pop(), True, 1, False
                elif done_host[s]:
                    slot_row[s] = -1
            if seg_groups > 1:  # `take_prompts`' contract: a fresh slot's prompt is on its chip
                s_run, p_run = np.flatnonzero(fresh) * groups // slots_n, run_of(slot_row[fresh])
                assert (s_run == p_run).all(), (s_run, p_run)
            live = ~done_host & (slot_row >= 0)
            need = p + bucket(int(t_host[live].max()), new, self.min_bucket)
            if need > length:
                slots = place("grow", slots_n)(slots, need)
                length = need
            n_live = int(live.sum())
            # Once no sample waits, exit when a quarter of the slots or fewer are live: shrinking
            # by 4x (not 2x) halves the slot shapes compiled for a small loss in the tail.
            quarter = max(slots_n // 4, 1)
            can_shrink = slot_bucket(quarter) < slots_n
            waits = any(queues)
            min_active = n_live if waits else (quarter + 1 if can_shrink else 1)
            self.stats["segments"] += 1
            self.stats["shapes"].append((slots_n, length))
            self.stats["prompt_runs"].append(seg_groups)
            slots, outputs = self._segment(
                params,
                slots,
                outputs,
                prefix,
                prompt_valid_BxP,
                token0,
                row_keys,
                budget,
                jnp.asarray(slot_row),
                jnp.asarray(fresh),
                jnp.int32(min(min_active, n_live)),
                length=length,
                prefix_sharding=prefix_sharding if seg_groups > 1 else None,
            )
            t_host, done_host = (np.array(x) for x in _to_host((slots["t"], slots["done"])))
            done_host |= slot_row < 0
            n_live = int((~done_host).sum())
            if not waits and 0 < n_live <= quarter and slot_bucket(n_live) < slots_n:
                keep = np.flatnonzero(~done_host)  # shrink the slot batch 4x (or more)
                new_n = slot_bucket(n_live)
                idx = np.concatenate([keep, np.full(new_n - n_live, keep[0])]).astype(np.int32)
                slots = place("compact", new_n)(slots, jnp.asarray(idx))
                slot_row = np.concatenate([slot_row[keep], np.full(new_n - n_live, -1)])
                slot_row = slot_row.astype(np.int32)
                t_host, done_host = t_host[idx], done_host[idx] | (slot_row < 0)
                slots_n = new_n
                seg_groups = runs(slots_n)  # no slot takes a prompt any more; a local gather
        return self._finish(prompt_BxP, prompt_valid_BxP, outputs)


def select(
    graphdef,
    cfg: SamplingConfig,
    model_cfg,
    name: str = "continuous",
    num_slots: int = 0,
    cache_budget_gib: float = 0.0,
    batch_shards: int = 1,
    head_shards: int = 1,
):
    """The callers' generate function (`rollout.engine` = name): the continuous `Engine`, or the
    static sampler when asked, or when the engine cannot decode `model_cfg` (logged).

    Rows decoded at once: `num_slots` when > 0, else as many as `cache_budget_gib` GiB per chip
    holds with the rows split over `batch_shards` chips (`layout.slots_for_budget`; 0 = no
    budget, every row at once): the engine's decode slots, the static sampler's row chunk. The
    engine's slot cache also splits its KV heads over `head_shards` chips as the decode layout
    does (`layout.kv_head_shards`, `cache_sharding`), so its budget holds that many times more
    slots; the static sampler's cache is XLA's to place, so its chunk does not count on it."""
    from jaxtrace.rollout import sampler  # noqa: PLC0415

    if name not in ENGINES:
        raise ValueError(f"rollout engine {name!r}; choose from {ENGINES}")
    length = cfg.max_prompt_len + cfg.max_new_tokens

    def budget_rows(heads):
        if num_slots:
            return 0
        return layout.slots_for_budget(model_cfg, length, cache_budget_gib, batch_shards, heads)

    if name == "continuous":
        max_slots = budget_rows(head_shards)
        try:
            check_supported(model_cfg)
            max_prompts = layout.prompts_for_budget(
                model_cfg, cfg.max_prompt_len, cache_budget_gib, batch_shards, head_shards
            )
            return Engine(
                graphdef, cfg, num_slots=num_slots, max_slots=max_slots, max_prompts=max_prompts
            )
        except ValueError as e:
            log.warning("%s: falling back to the static sampler", e)
    return sampler.make_generate(graphdef, cfg, max_rows=num_slots or budget_rows(1))


def make_generate(graphdef, cfg: SamplingConfig, **engine_kwargs):
    """`(params, prompt, prompt_valid, rng, max_new_B=None) -> rollout dict`, like
    `sampler.make_generate`, decoded by the continuous-batching `Engine` (kwargs: its
    num_slots, min_bucket, min_slots, max_slots)."""
    return Engine(graphdef, cfg, **engine_kwargs)
