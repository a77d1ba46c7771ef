"""Qwen3 dense decoder in Flax NNX, numerically equal to Hugging Face `Qwen3ForCausalLM`.

Every parameter carries `logical_axes` metadata (`vocab`, `embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `norm`, `expert`); `jaxtrace.sharding` maps them to mesh axes.

Attention takes an `AttentionMask` (jaxtrace.models.attention: kv_valid [B, S] and each query's
cache slot q_slot [B, T], O(B * S) instead of a dense [B, T, S] mask) and, when decoding, a
per-layer KV cache {"k", "v": [B, Hkv, S, Dh]} written at `cache_index` (an int: the same slot
for every row; an int array [B]: a decode step's slot per row, `write_rows`). The model returns
final hidden states; `lm_head_weight()` gives the [D, V] head so that losses can work from hidden
states without materialising logits (`pallas_kernels.span_kl`).

Layers are stored stacked and run under `jax.lax.scan` (`run_layers`): `params["layers"][j]`
holds layers j, j + p, j + 2p, ... (p = `cfg.param_period`, the period of the MoE / dense
pattern) with a leading "layers" axis, and the scan steps over blocks of `cfg.scan_period`
layers (the period of the MoE / hybrid pattern). The model's cache (`init_cache`) is stacked the
same way per block position; a layer sees its own slice, in the layout above.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrace.models.attention import AttentionMask, attention, causal_mask  # noqa: F401
from jaxtrace.models.config import ModelConfig

Cache = dict[str, jax.Array]


def _param(rngs: nnx.Rngs, shape, axes, dtype, std: float = 0.02) -> nnx.Param:
    init = jax.random.normal(rngs.params(), shape, jnp.float32) * std
    return nnx.Param(init.astype(dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, axes=("norm",)):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=axes)
        self.eps = eps

    def __call__(self, x):
        # Normalise in float32 and cast back before the scale, as transformers does.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


def rope(x_BxTxHxD, positions_BxT, theta: float):
    """Rotary embedding, half-split layout (`rotate_half`), as Hugging Face applies it."""
    d = x_BxTxHxD.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq  # B, T, D/2
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x_BxTxHxD.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxD.dtype)


def write_rows(cache_BxKxSxD, x_BxKx1xD, slot_B):
    """One new key / value per row at its own slot (the rollout engine's rows sit at different
    lengths). A slot outside [0, S) writes nothing: idle rows pass S."""
    rows = jnp.arange(cache_BxKxSxD.shape[0])
    new = x_BxKx1xD[:, :, 0].astype(cache_BxKxSxD.dtype)
    return cache_BxKxSxD.at[rows, :, slot_B].set(new, mode="drop")


def write_stacked(cache, k_BxKxTxD, v_BxKxTxD, cache_index):
    """The new keys / values written into layer `cache["layer"]` of the stacked caches
    `cache["k"]` / `cache["v"]` [layers, B, Hkv, S, Dh] in place: at per-row slots (cache_index
    [B]; a slot outside [0, S) writes nothing) or at one offset for every row. Slicing the layer
    out, writing it and putting it back would copy the layer's whole cache twice per step."""
    a = cache["layer"]
    out = dict(cache)
    for name, x in (("k", k_BxKxTxD), ("v", v_BxKxTxD)):
        stacked = cache[name]
        if jnp.ndim(cache_index) == 1:
            rows = jnp.arange(stacked.shape[1])
            out[name] = stacked.at[a, rows, :, cache_index].set(
                x[:, :, 0].astype(stacked.dtype), mode="drop"
            )
        else:
            start = (a, 0, 0, cache_index, 0)
            out[name] = jax.lax.dynamic_update_slice(stacked, x[None].astype(stacked.dtype), start)
    return out


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, k, dh, pd = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.weight_dtype,
        )
        self.q_proj = _param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), pd)
        self.k_proj = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = _param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), pd)
        self.q_norm = RMSNorm(dh, cfg.rms_norm_eps, pd, axes=("head_dim",))
        self.k_norm = RMSNorm(dh, cfg.rms_norm_eps, pd, axes=("head_dim",))
        self.rope_theta = cfg.rope_theta
        self.dtype = cfg.compute_dtype
        self.attention_impl, self.attention_block = cfg.attention_impl, cfg.attention_block

    def project_qkv(self, x_BxTxD, positions_BxT):
        dt = self.dtype
        q = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.q_proj[...].astype(dt))
        k = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.k_proj[...].astype(dt))
        v = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.v_proj[...].astype(dt))
        q = rope(self.q_norm(q), positions_BxT, self.rope_theta)
        k = rope(self.k_norm(k), positions_BxT, self.rope_theta)
        return q, k, v

    def output(self, o_BxTxHxD):
        return jnp.einsum("bthk,hkd->btd", o_BxTxHxD, self.o_proj[...].astype(self.dtype))

    def __call__(
        self,
        x_BxTxD,
        positions_BxT,
        mask: AttentionMask,
        cache: Cache | None = None,
        cache_index=None,
    ):
        q, k, v = self.project_qkv(x_BxTxD, positions_BxT)
        k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, Hkv, T, Dh], as cached
        if (
            cache is not None and "layer" in cache
        ):  # `run_layers`' stacked cache, this layer's index
            cache = write_stacked(cache, k, v, cache_index)
            k, v = (jax.lax.dynamic_index_in_dim(cache[n], cache["layer"], 0, False) for n in "kv")
        elif cache is not None and jnp.ndim(cache_index) == 1:
            k, v = (write_rows(cache[n], x, cache_index) for n, x in (("k", k), ("v", v)))
            cache = {"k": k, "v": v}
        elif cache is not None:
            start = (0, 0, cache_index, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            cache = {"k": k, "v": v}
        k, v = k.astype(self.dtype), v.astype(self.dtype)
        o = attention(q, k, v, mask, self.attention_impl, self.attention_block)
        return self.output(o), cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, intermediate_size: int | None = None):
        d, f, pd = cfg.hidden_size, intermediate_size or cfg.intermediate_size, cfg.weight_dtype
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), pd)
        self.dtype = cfg.compute_dtype

    def __call__(self, x_BxTxD):
        dt = self.dtype
        gate = x_BxTxD @ self.gate_proj[...].astype(dt)
        up = x_BxTxD @ self.up_proj[...].astype(dt)
        return (jax.nn.silu(gate) * up) @ self.down_proj[...].astype(dt)


def _make_mlp(cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    if cfg.is_moe_layer(layer):
        from jaxtrace.models.moe import MoeMLP  # noqa: PLC0415 (only MoE configs need it)

        return MoeMLP(cfg, rngs)
    return MLP(cfg, rngs)


def _make_attention(cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    if cfg.family == "qwen3_hybrid" and layer in cfg.hybrid_layers:
        from jaxtrace.models.hybrid import HybridAttention  # noqa: PLC0415

        return HybridAttention(cfg, rngs)
    return Attention(cfg, rngs)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        pd = cfg.weight_dtype
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        self.self_attn = _make_attention(cfg, layer, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        self.mlp = _make_mlp(cfg, layer, rngs)

    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        h, cache = self.self_attn(self.input_layernorm(x), positions, mask, cache, cache_index)
        x = x + h
        y = self.mlp(self.post_attention_layernorm(x))
        aux = None
        if isinstance(y, tuple):  # MoE layers also return router statistics
            y, aux = y
        return x + y, cache, aux


REMAT_POLICIES = {  # ModelConfig.remat -> jax.checkpoint policy (config.REMAT documents them)
    "full": None,  # save nothing: recompute the whole layer
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _stack_layers(layers: list[DecoderLayer], p: int) -> list[DecoderLayer]:
    """p modules, the j-th holding layers j, j + p, j + 2p, ... stacked on a leading axis
    (logical axis "layers")."""
    stacks = []
    for j in range(p):
        group = layers[j::p]
        states = [nnx.state(layer, nnx.Param) for layer in group]
        nnx.update(group[0], jax.tree.map(lambda *w: jnp.stack(w), *states))
        for _, var in nnx.iter_graph(group[0]):
            if isinstance(var, nnx.Param):
                var.set_metadata(logical_axes=("layers", *var.get_metadata()["logical_axes"]))
        stacks.append(group[0])
    return stacks


def _index(tree, i):
    return jax.tree.map(lambda w: w[i], tree)


@functools.lru_cache(maxsize=256)
def _layer_graphdef(cfg: ModelConfig, i: int):
    """The module graph of layer i (its attention / MLP kind), to merge with a params slice."""
    return nnx.split(nnx.eval_shape(lambda: DecoderLayer(cfg, i, nnx.Rngs(params=0))))[0]


def unstack_layers(cfg: ModelConfig, stacks) -> list:
    """Layer i's params, for i < num_layers: `_index(stacks[i % p], i // p)`, p the param
    period. Sliced once, outside a decode loop, they are buffers of their own: XLA:CPU copies a
    layer's weights out of the stack before every dot that reads them, once per decode step."""
    pp = cfg.param_period
    return [_index(stacks[i % pp], i // pp) for i in range(cfg.num_layers)]


def unstacked_decode() -> bool:
    """Whether decode loops run on `unstack_layers` and `unstack_cache` rather than the layer
    scan: on CPU (`_mesh.target_platform`), where XLA copies each layer's weights out of the
    stack on every step (vs_peers' decode: 1.3x faster unstacked). Not on TPU, where the scan
    bounds the compile time of deep models, nor (unmeasured) GPU; there the unstacked cache
    would also be a second copy of the cache at each segment's start and end."""
    from pallas_kernels import _mesh  # noqa: PLC0415

    return _mesh.target_platform() == "cpu"


def decode_loop_layout(model, cache: list[Cache]):
    """(layers, cache) for a decode loop over `model` (a merged `Qwen3`): on CPU
    (`unstacked_decode`) every layer's weights and cache sliced out once, to pass as
    `model(..., cache, ..., layers=layers)` inside the loop (`stack_cache` restacks the cache
    after it); elsewhere (None, cache), the layer scan."""
    if not unstacked_decode():
        return None, cache
    return unstack_layers(model.cfg, model.layer_stacks()), unstack_cache(model.cfg, cache)


def unstack_cache(cfg: ModelConfig, cache: list[Cache]) -> list[Cache]:
    """`init_cache`'s stacked layout -> one cache per layer (leaves [B, ...]), layer i at i."""
    pe = cfg.scan_period
    return [_index(cache[i % pe], i // pe) for i in range(cfg.num_layers)]


def stack_cache(cfg: ModelConfig, per_layer: list[Cache]) -> list[Cache]:
    """`unstack_cache`'s inverse."""
    pe = cfg.scan_period
    return [jax.tree.map(lambda *c: jnp.stack(c), *per_layer[q::pe]) for q in range(pe)]


def run_layers(
    cfg: ModelConfig, stacks, x, positions, mask, cache=None, cache_index=None, layers=None
):
    """The decoder layers over stacked params.

    Args:
      stacks: `params["layers"]` (pure dicts): param_period stacks, leaves [L / param_period, ...].
      x: [B, T, D] embedded tokens; positions [B, T]; mask: the attention mask, passed to every
        layer untouched; cache: `init_cache`'s layout or None; cache_index as `Attention`'s.
    Returns:
      (x [B, T, D], cache in the same layout or None, aux: one entry per layer, None for dense).

    Layers run in blocks of p = cfg.scan_period (one of each kind in the repeating pattern);
    with `scan_layers` a `jax.lax.scan` over the L / p blocks, so the program holds one block
    whatever the depth. The cache is part of the scan carry, each block reading and writing its
    own index, rather than a scanned input and output (which would hold two copies of it).

    `layers` (`unstack_layers`' list; then `stacks` is unused and the cache, if any, is
    `unstack_cache`'s): the layers one by one, unrolled, each on its own params and cache - a
    decode loop's layout on CPU (`unstacked_decode`).
    """
    if layers is not None:
        aux, out_cache = [], None if cache is None else list(cache)
        for i, layer_params in enumerate(layers):
            c = None if cache is None else cache[i]
            apply = nnx.merge(_layer_graphdef(cfg, i % cfg.scan_period), layer_params)
            x, c, a = apply(x, positions, mask, c, cache_index)
            if cache is not None:
                out_cache[i] = c
            aux.append(a)
        return x, out_cache, aux
    pp, pe, n = cfg.param_period, cfg.scan_period, cfg.num_layers
    nb, per = n // pe, pe // pp  # blocks; entries of each param stack per block
    blocks = [jax.tree.map(lambda w: w.reshape(nb, per, *w.shape[1:]), s) for s in stacks]
    remat = cfg.remat != "none" and x.shape[1] > 1  # training passes, not decode steps

    def layer_fn(q):
        graphdef = _layer_graphdef(cfg, q)

        def apply(params, x, positions, mask, c):
            return nnx.merge(graphdef, params)(x, positions, mask, c, cache_index)

        if remat:
            policy = REMAT_POLICIES[cfg.remat]
            return jax.checkpoint(apply, policy=policy, prevent_cse=not cfg.scan_layers)
        return apply

    fns = [layer_fn(q) for q in range(pe)]
    at = lambda a: lambda s: jax.lax.dynamic_index_in_dim(s, a, 0, keepdims=False)  # noqa: E731

    def block(x, cache, a, params):
        cache = None if cache is None else list(cache)
        auxs = []
        for q in range(pe):
            layer_params = _index(params[q % pp], q // pp)
            if cache is not None and is_kv(cache[q]) and x.shape[1] == 1:
                # Decode steps: the attention writes into the stacked cache itself
                # (`write_stacked`). Not for passes of T > 1: a training pass differentiates
                # through its cache, and the whole stacked cache as a layer's input would be
                # saved for the backward once per layer.
                x, c, aux = fns[q](layer_params, x, positions, mask, {**cache[q], "layer": a})
                cache[q] = {"k": c["k"], "v": c["v"]}
            else:
                c = None if cache is None else jax.tree.map(at(a), cache[q])
                x, c, aux = fns[q](layer_params, x, positions, mask, c)
                if cache is not None:
                    put = lambda s, v: jax.lax.dynamic_update_index_in_dim(  # noqa: E731
                        s, v.astype(s.dtype), a, 0
                    )
                    cache[q] = jax.tree.map(put, cache[q], c)
            auxs.append(aux)
        return x, cache, auxs

    if cfg.scan_layers and nb > 1:

        def body(carry, inputs):
            x, cache, auxs = block(*carry, *inputs)
            return (x, cache), auxs

        (x, cache), auxs = jax.lax.scan(body, (x, cache), (jnp.arange(nb), blocks))
        aux = [_index(auxs[i % pe], i // pe) for i in range(n)]
    else:
        aux = []
        for a in range(nb):
            x, cache, auxs = block(x, cache, a, _index(blocks, a))
            aux += auxs
    return x, cache, aux


class Qwen3(nnx.Module):
    """Decoder-only LM. `__call__` returns final-norm hidden states [B, T, D].

    Decoder layers are stored stacked (`params["layers"][j]`: layers j, j + p, ... for
    p = cfg.param_period, leading axis "layers") and run by `run_layers`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = cfg.weight_dtype
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
        layers = [DecoderLayer(cfg, i, rngs) for i in range(cfg.num_layers)]
        self.layers = nnx.List(_stack_layers(layers, cfg.param_period))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

    def __call__(
        self,
        tokens_BxT,
        positions_BxT,
        mask: AttentionMask,
        cache=None,
        cache_index=None,
        return_aux: bool = False,
        layers=None,
    ):
        x = jnp.take(self.embed_tokens[...], tokens_BxT, axis=0).astype(self.cfg.compute_dtype)
        stacks = None if layers is not None else self.layer_stacks()
        x, out_cache, aux = run_layers(
            self.cfg, stacks, x, positions_BxT, mask, cache, cache_index, layers
        )
        hidden = self.norm(x)
        if return_aux:
            return hidden, out_cache, aux
        return hidden, out_cache

    def layer_stacks(self) -> list:
        """`params["layers"]` as pure dicts (`run_layers`' stacks)."""
        return [nnx.to_pure_dict(nnx.state(s, nnx.Param)) for s in self.layers]

    def lm_head_weight(self):
        """The [D, V] output projection (the transposed embedding when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens[...].T
        return self.lm_head[...]

    def logits(self, hidden_BxTxD):
        w = self.lm_head_weight().astype(hidden_BxTxD.dtype)
        return jnp.einsum("btd,dv->btv", hidden_BxTxD, w, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------- masks and caches
def positions_from_valid(valid_BxT):
    """Position ids that count only real tokens (left padding gets position 0)."""
    return jnp.maximum(jnp.cumsum(valid_BxT.astype(jnp.int32), axis=1) - 1, 0)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> list[Cache]:
    """An empty KV cache, stacked like the scanned blocks: entry q (q < cfg.scan_period) holds
    layers q, q + p, ... on a leading axis: {"k", "v": [L / p, B, Hkv, S, Dh]} (hybrid layers:
    their own state, each leaf with the same leading axis). Rows are axis 1 (`CACHE_ROW_AXIS`).

    Head-major, so that a decode step's attention reads the cache as it lies: with the slot axis
    before the heads, XLA re-lays out every layer's whole cache on every step."""
    dtype = dtype or cfg.compute_dtype
    nb = cfg.num_layers // cfg.scan_period
    caches = []
    for q in range(cfg.scan_period):
        if cfg.is_hybrid_layer(q):
            from jaxtrace.models.hybrid import init_hybrid_cache  # noqa: PLC0415

            state = init_hybrid_cache(cfg, batch, dtype)
            caches.append(jax.tree.map(lambda x: jnp.broadcast_to(x, (nb, *x.shape)), state))
        else:
            shape = (nb, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
            caches.append({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)})
    return caches


CACHE_ROW_AXIS = 1  # every cache leaf is [layers, rows, ...]


def is_kv(layer_cache) -> bool:
    """An attention layer's {"k", "v"} (else a hybrid layer's HybridState)."""
    return isinstance(layer_cache, dict)


def take_cache_rows(cache: list[Cache], rows) -> list[Cache]:
    """The cache of rows `rows` (an int array) of every layer."""
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=CACHE_ROW_AXIS), cache)


def repeat_cache_rows(cache: list[Cache], repeats: int) -> list[Cache]:
    """Every row repeated `repeats` times in place (row r -> rows r * repeats ...)."""
    return jax.tree.map(lambda x: jnp.repeat(x, repeats, axis=CACHE_ROW_AXIS), cache)


def pad_cache_slots(cache: list[Cache], length: int) -> list[Cache]:
    """Attention caches padded with empty slots to `length` (hybrid states: unchanged)."""
    pad = lambda c: jnp.pad(c, ((0, 0), (0, 0), (0, 0), (0, length - c.shape[3]), (0, 0)))  # noqa: E731
    return [{n: pad(c) for n, c in lyr.items()} if is_kv(lyr) else lyr for lyr in cache]


def grow_cache(cache: list[Cache], repeats: int, extra_slots: int) -> list[Cache]:
    """Each row of an attention cache repeated `repeats` times and `extra_slots` empty slots
    appended (a prompt's cache shared by the responses of its group)."""
    pad = ((0, 0), (0, 0), (0, 0), (0, extra_slots), (0, 0))
    cache = repeat_cache_rows(cache, repeats)
    return [{n: jnp.pad(c, pad) for n, c in lyr.items()} if is_kv(lyr) else lyr for lyr in cache]
