"""Where the sampler's weights and KV cache live: the decode layout and the cache budget.

**Decode layout** (`rollout.decode_layout`; rules tables in `sharding.decode_rules`). Training
keeps the params FSDP-sharded, so a decode step on them would all-gather every weight on every
step. Instead, once per RL step, one jitted function with `out_shardings` copies the params into
the decode layout: "replicated" (each weight whole on every chip, the rows split over the data
axes: data-parallel decode, the usual choice when the weights fit one chip), "tensor"
(tensor-parallel over the "tensor" mesh axis, the FSDP axis replicated) or "train" (as placed;
no copy unless cast). With `rollout.decode_in_compute_dtype` (default on) the copy's floating
weights are cast to the model's compute dtype when it differs from the param dtype (bf16
decoding of fp32 params): the model casts every weight to that dtype before use anyway, so the
cast copy decodes exactly as the params do, in half the bytes. `DecodeWeights` keeps the copy for
every sampler call of the step (rollout attempts, self-annotation) until `release()`, which the
trainer calls before the update, so the copy never sits beside the training step's temporaries.

**Cache budget** (`rollout.cache_budget_gib`, per chip). One decode slot's KV cache at the full
length P + N (prompt + response budget) takes

    slot_bytes = 2 (k and v) x attention layers x kv_heads x (P + N) x head_dim x itemsize

bytes (cache dtype = the compute dtype; a hybrid layer adds its constant per-row state, and
`slot_cache_bytes` counts `init_cache`'s shapes, so every family is covered). The engine splits
its slots over the mesh's batch axes (d = `sharding.data_parallel_size`) and, where the decode
layout splits the KV heads (h = `kv_head_shards`: the "tensor" axis of the tensor layout), each
attention cache's heads as well, so S slots take ceil(S / d) x slot_bytes / h per chip, and a
budget of B bytes holds

    slots = floor(B / (slot_bytes / h)) x d

(`slots_for_budget`). The continuous engine then uses min(rows, slots) decode slots (waiting
samples take freed slots); the static sampler generates in chunks of at most that many rows
(whole prompts). `rollout.decode_slots` > 0 overrides the derived number; a budget of 0 means
unbounded (one slot per row). Not counted here (the AOT tool measures them): the prompts'
prefilled KV (P slots per prompt, not per row), the output buffers ([R, N] int32 + float32)
and a decode step's temporaries.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

GIB = 1024**3


# ---------------------------------------------------------------------------- decode layout
def decode_dtype(model_cfg, in_compute_dtype: bool):
    """The dtype of the decode copy's floating weights, or None to keep the params' own."""
    if in_compute_dtype and model_cfg.dtype != model_cfg.param_dtype:
        return model_cfg.compute_dtype
    return None


def decode_shardings(model_cfg, mesh, layout: str):
    """A params-shaped tree of NamedSharding: `layout`'s rules on `mesh`."""
    from jaxtrace import sharding  # noqa: PLC0415 (sharding imports the models package)

    return sharding.param_shardings(model_cfg, mesh, sharding.decode_rules(layout))


def _cast(params, dtype):
    if dtype is None:
        return params
    floating = lambda x: jnp.issubdtype(x.dtype, jnp.floating)  # noqa: E731
    return jax.tree.map(lambda x: x.astype(dtype) if floating(x) else x, params)


def make_reshard(model_cfg, mesh, layout: str, in_compute_dtype: bool = True):
    """A jitted `params -> decode params` (a new copy; the params are left as they are, nothing
    is donated), or None when the decode layout is the params' own (nothing to copy: layout
    "train" without a cast, or no mesh and no cast)."""
    from jaxtrace import sharding  # noqa: PLC0415

    sharding.decode_rules(layout)  # a ValueError naming a bad layout, mesh or not
    dtype = decode_dtype(model_cfg, in_compute_dtype)
    if dtype is None and (mesh is None or layout == "train"):
        return None
    out = None if mesh is None else decode_shardings(model_cfg, mesh, layout)
    return jax.jit(lambda p: _cast(p, dtype), out_shardings=out)


def abstract_decode_params(abstract_params, model_cfg, mesh, layout: str, in_compute_dtype=True):
    """The decode copy of abstract params (ShapeDtypeStructs with the decode layout's shardings
    and dtype), for the AOT tool; the params themselves when there is nothing to copy."""
    if make_reshard(model_cfg, mesh, layout, in_compute_dtype) is None:
        return abstract_params
    dtype = decode_dtype(model_cfg, in_compute_dtype)
    shardings = decode_shardings(model_cfg, mesh, layout)

    def one(x, s):
        dt = dtype if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        return jax.ShapeDtypeStruct(x.shape, dt, sharding=s)

    return jax.tree.map(one, abstract_params, shardings)


class DecodeWeights:
    """`weights(params)` is the decode copy of `params`: made by `reshard` on the first call with
    these params and returned again while they are the same arrays (every sampler call of one RL
    step), until `release()` frees it. With `reshard=None`, the params themselves."""

    def __init__(self, reshard=None):
        self.reshard = reshard
        self._source: list | None = None  # the leaves the copy was made from
        self._copy = None
        self.copies = 0  # reshards done (tests count them)

    @classmethod
    def from_config(cls, rollout_cfg, model_cfg, mesh) -> DecodeWeights:
        r = rollout_cfg
        return cls(make_reshard(model_cfg, mesh, r.decode_layout, r.decode_in_compute_dtype))

    def __call__(self, params):
        if self.reshard is None:
            return params
        leaves = jax.tree.leaves(params)
        same = self._source is not None and len(leaves) == len(self._source)
        if not (same and all(a is b for a, b in zip(leaves, self._source))):
            self.release()  # the old copy goes first: never two copies at once
            self._copy, self._source = self.reshard(params), leaves
            self.copies += 1
        return self._copy

    def release(self) -> None:
        """Drops the copy (its HBM is freed once no caller holds it)."""
        self._source = self._copy = None


def in_decode_layout(generate, weights: DecodeWeights):
    """`generate` (a sampler: params first) called on `weights(params)`."""
    if weights.reshard is None:
        return generate

    def run(params, *args, **kwargs):
        return generate(weights(params), *args, **kwargs)

    run.inner = generate
    return run


# ---------------------------------------------------------------------------- cache budget
def slot_cache_bytes(model_cfg, length: int, head_shards: int = 1) -> int:
    """Bytes of one decode slot's cache at `length` slots (every layer; see the module doc) on
    one chip when its attention layers' KV heads are split over `head_shards` chips (hybrid
    layers' states are not split)."""
    from jaxtrace.models import init_cache, is_kv  # noqa: PLC0415

    total = 0
    for entry in jax.eval_shape(lambda: init_cache(model_cfg, 1, length)):
        split = head_shards if is_kv(entry) else 1
        for x in jax.tree.leaves(entry):
            total += math.prod(x.shape) * jnp.dtype(x.dtype).itemsize // split
    return total


def kv_head_shards(model_cfg, mesh, decode_layout: str) -> int:
    """Chips the decode layout splits the KV heads over on `mesh` (the engine splits its slot
    cache the same way, `engine.cache_sharding`); 1 without a mesh or a split."""
    from jaxtrace import sharding  # noqa: PLC0415

    if mesh is None:
        return 1
    rules = sharding.decode_rules(decode_layout)
    axes = sharding.logical_to_spec(("kv_heads",), (model_cfg.num_kv_heads,), mesh, rules)[0]
    return sharding.axes_size(mesh, axes)


def slots_for_budget(
    model_cfg, length: int, budget_gib: float, batch_shards: int = 1, head_shards: int = 1
) -> int:
    """Decode slots whose cache at `length` fits `budget_gib` GiB per chip when the slots are
    split over `batch_shards` chips and their KV heads over `head_shards` (`kv_head_shards`):
    floor(budget / per-chip slot bytes) x batch_shards; 0 for no budget (budget_gib == 0). A
    ValueError when the budget holds no slot."""
    if budget_gib < 0 or not math.isfinite(budget_gib):
        raise ValueError(f"cache budget {budget_gib} GiB must be finite and >= 0 (0 = none)")
    if budget_gib == 0:
        return 0
    per_slot = slot_cache_bytes(model_cfg, length, head_shards)
    per_chip = int(budget_gib * GIB // per_slot)
    if per_chip < 1:
        raise ValueError(
            f"rollout.cache_budget_gib={budget_gib} holds no decode slot: one slot's KV cache at "
            f"{length} tokens (prompt + response budget) takes {per_slot / GIB:.3f} GiB per chip"
        )
    return per_chip * max(int(batch_shards), 1)


PREFIX_SHARE = 0.25  # of the cache budget, for the engine's prompt prefixes (one pass's)


def prompts_for_budget(
    model_cfg, prompt_len: int, budget_gib: float, batch_shards: int = 1, head_shards: int = 1
):
    """Prompts per engine pass whose prefix caches (`prompt_len` slots each, kept until the
    pass's rows finish) take at most PREFIX_SHARE of `budget_gib` per chip, the prompts split
    over `batch_shards` chips (and their KV heads over `head_shards`); a multiple of
    batch_shards, at least one per shard; 0 for no budget (every prompt in one pass). Rollout
    prompts are short (a pass holds them all); the self-annotation prompts are long and many,
    and pass in chunks."""
    if budget_gib <= 0:
        return 0
    shards = max(int(batch_shards), 1)
    per_prompt = slot_cache_bytes(model_cfg, prompt_len, head_shards)
    per_chip = int(PREFIX_SHARE * budget_gib * GIB // per_prompt)
    return max(per_chip, 1) * shards
