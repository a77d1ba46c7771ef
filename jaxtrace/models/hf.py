"""Hugging Face interop: safetensors <-> params, config.json <-> ModelConfig.

One explicit table per model family maps HF tensor names to params paths with the transform each
way. Only safetensors are read or written (never pickle).

    cfg, graphdef, params = load_hf("path/to/Qwen3-1.7B")          # a notebook's entry point
    logits = forward_logits(graphdef, params, token_ids)
    save_hf(cfg, params, "out/")                                    # loads in transformers
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrace.models import abstract_model
from jaxtrace.models.config import ModelConfig, from_hf_dict, to_hf_dict

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "tokenizer.model",
)

# A mapping row: (HF name, params path, to_ours(hf_array) -> array, to_hf(array) -> hf_array).
# A decoder layer's path is ("layers", j, b, ...): entry b of stack j (`Qwen3`'s stacked layout,
# layer i = j + b * cfg.param_period); an expert's ends (..., name, e): entry e of that leaf.
Row = tuple[str, tuple, Callable, Callable]


def _linear(shape_ours):
    """HF nn.Linear weight [out, in] <-> ours [in, ...out dims]."""
    return (lambda w: w.T.reshape(shape_ours), lambda w: w.reshape(shape_ours[0], -1).T)


def _linear_out(shape_ours):
    """HF o_proj [D, H*Dh] <-> ours [H, Dh, D]."""
    return (lambda w: w.T.reshape(shape_ours), lambda w: w.reshape(-1, shape_ours[-1]).T)


_same = (lambda w: w, lambda w: w)


def _layer_path(cfg: ModelConfig, i: int) -> tuple:
    return ("layers", i % cfg.param_period, i // cfg.param_period)


def _attention_rows(cfg: ModelConfig, i: int) -> list[Row]:
    d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pre, path = f"model.layers.{i}.self_attn.", _layer_path(cfg, i) + ("self_attn",)
    return [
        (pre + "q_proj.weight", path + ("q_proj",), *_linear((d, h, dh))),
        (pre + "k_proj.weight", path + ("k_proj",), *_linear((d, k, dh))),
        (pre + "v_proj.weight", path + ("v_proj",), *_linear((d, k, dh))),
        (pre + "o_proj.weight", path + ("o_proj",), *_linear_out((h, dh, d))),
        (pre + "q_norm.weight", path + ("q_norm", "weight"), *_same),
        (pre + "k_norm.weight", path + ("k_norm", "weight"), *_same),
    ]


def _dense_mlp_rows(cfg: ModelConfig, i: int) -> list[Row]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    pre, path = f"model.layers.{i}.mlp.", _layer_path(cfg, i) + ("mlp",)
    return [
        (pre + "gate_proj.weight", path + ("gate_proj",), *_linear((d, f))),
        (pre + "up_proj.weight", path + ("up_proj",), *_linear((d, f))),
        (pre + "down_proj.weight", path + ("down_proj",), *_linear((f, d))),
    ]


def _moe_mlp_rows(cfg: ModelConfig, i: int) -> list[Row]:
    """Qwen3-MoE: router `mlp.gate` [E, D] and per-expert SwiGLU, stacked on our side [E, ...]."""
    d, f, n = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    pre, path = f"model.layers.{i}.mlp.", _layer_path(cfg, i) + ("mlp",)
    rows = [(pre + "gate.weight", path + ("router",), *_linear((d, n)))]
    for name, shape in (("gate_proj", (d, f)), ("up_proj", (d, f)), ("down_proj", (f, d))):
        for e in range(n):
            to_ours, to_hf = _linear(shape)
            rows.append((f"{pre}experts.{e}.{name}.weight", path + (name, e), to_ours, to_hf))
    return rows


def mapping(cfg: ModelConfig) -> list[Row]:
    """The full HF <-> params table for `cfg`."""
    rows: list[Row] = [
        ("model.embed_tokens.weight", ("embed_tokens",), *_same),
        ("model.norm.weight", ("norm", "weight"), *_same),
    ]
    if not cfg.tie_word_embeddings:
        rows.append(("lm_head.weight", ("lm_head",), lambda w: w.T, lambda w: w.T))
    for i in range(cfg.num_layers):
        pre, path = f"model.layers.{i}.", _layer_path(cfg, i)
        rows += [
            (pre + "input_layernorm.weight", path + ("input_layernorm", "weight"), *_same),
            (
                pre + "post_attention_layernorm.weight",
                path + ("post_attention_layernorm", "weight"),
                *_same,
            ),
        ]
        rows += _attention_rows(cfg, i)
        rows += _moe_mlp_rows(cfg, i) if cfg.is_moe_layer(i) else _dense_mlp_rows(cfg, i)
    return rows


# ---------------------------------------------------------------------------- tree helpers
def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _split_path(path):
    """(params leaf path, layer index b or None, expert index e or None) of a mapping path:
    a layer row ("layers", j, b, ...) is entry b of leaf ("layers", j, ...); an expert row
    (..., name, e) entry e of leaf (..., name)."""
    layer = None
    if path[0] == "layers":
        path, layer = path[:2] + path[3:], path[2]
    if (
        len(path) >= 2
        and isinstance(path[-1], int)
        and path[-2] in ("gate_proj", "up_proj", "down_proj")
    ):
        return path[:-1], layer, path[-1]
    return path, layer, None


def _without_leading(sharding, ndim: int):
    """The sharding of one entry of an array sharded by `sharding` along its leading axis
    (which the rules replicate: "layers")."""
    spec = tuple(sharding.spec) + (None,) * (ndim + 1 - len(sharding.spec))
    if spec[0] is not None:
        raise ValueError(f"a stacked layers axis must be replicated, got spec {sharding.spec}")
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))


@functools.lru_cache(maxsize=64)
def _writer(sharding):
    """jit: buf [L, ...] with entry b replaced by x [...], in place (buf donated)."""

    def write(buf, x, b):
        return jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), b, 0)

    return jax.jit(write, donate_argnums=0, out_shardings=sharding)


# ---------------------------------------------------------------------------- reading
def read_config(hf_dir: str, **overrides) -> ModelConfig:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json in HF folder {hf_dir!r}")
    with open(path) as f:
        return from_hf_dict(json.load(f), **overrides)


def _weight_files(hf_dir: str) -> list[str]:
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(hf_dir, name) for name in files]
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    if any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(hf_dir)):
        raise ValueError(
            f"{hf_dir!r} holds only pickle weights (.bin/.pt); jaxtrace reads "
            "safetensors only — convert them with transformers first"
        )
    raise FileNotFoundError(f"no model.safetensors(.index.json) in {hf_dir!r}")


def _iter_tensors(hf_dir: str) -> Iterator[tuple[str, jax.Array]]:
    from safetensors import safe_open  # noqa: PLC0415

    for path in _weight_files(hf_dir):
        with safe_open(path, framework="flax") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_params(cfg: ModelConfig, hf_dir: str, shardings=None):
    """Reads HF safetensors into a params tree of `cfg`'s shapes (optionally placed by
    `shardings`, a params-shaped tree of `jax.sharding.Sharding`): one tensor in host memory at
    a time. Per-layer tensors are written into their stacked leaf in place (on its devices)."""
    _, abstract = abstract_model(cfg)
    rows = {name: (path, to_ours) for name, path, to_ours, _ in mapping(cfg)}
    params = jax.tree.map(lambda _: None, abstract)
    experts: dict[tuple, dict[int, jax.Array]] = {}
    seen = set()
    for name, tensor in _iter_tensors(hf_dir):
        if name not in rows:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some exporters write the tied head anyway
            if "rotary_emb" in name:
                continue
            raise ValueError(f"unexpected tensor {name!r} in {hf_dir!r} for a {cfg.family} model")
        seen.add(name)
        path, to_ours = rows[name]
        leaf_path, layer, expert = _split_path(path)
        target = _get(abstract, leaf_path)
        shape = target.shape[1:] if layer is not None else target.shape
        value = to_ours(tensor)
        if expert is not None:
            key = (leaf_path, layer)
            experts.setdefault(key, {})[expert] = value
            if len(experts[key]) < cfg.num_experts:
                continue
            stacked = experts.pop(key)
            value = jnp.stack([stacked[e] for e in range(cfg.num_experts)])
        if value.shape != shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, which maps to "
                f"{value.shape} but the config expects {shape}"
            )
        value = value.astype(target.dtype)
        sharding = None if shardings is None else _get(shardings, leaf_path)
        if layer is None:
            _set(params, leaf_path, value if sharding is None else jax.device_put(value, sharding))
            continue
        if sharding is not None:
            value = jax.device_put(value, _without_leading(sharding, len(shape)))
        buf = _get(params, leaf_path)
        if buf is None:
            buf = jnp.zeros(target.shape, target.dtype, device=sharding)
        _set(params, leaf_path, _writer(sharding)(buf, value, layer))
    missing = sorted(set(rows) - seen)
    if missing:
        raise ValueError(f"{len(missing)} tensors missing from {hf_dir!r}, e.g. {missing[:3]}")
    return params


def load_hf(hf_dir: str, shardings_fn=None, **config_overrides):
    """Loads an HF folder: returns (cfg, graphdef, params). `shardings_fn(cfg)` may give the
    params shardings to load straight onto a mesh."""
    cfg = read_config(hf_dir, **config_overrides)
    graphdef, _ = abstract_model(cfg)
    shardings = shardings_fn(cfg) if shardings_fn is not None else None
    return cfg, graphdef, load_params(cfg, hf_dir, shardings)


# ---------------------------------------------------------------------------- writing
def save_hf(
    cfg: ModelConfig,
    params,
    out_dir: str,
    *,
    tokenizer_dir: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: str | None = None,
) -> str:
    """Writes `params` as an HF folder (config.json + safetensors, sharded with an index when
    larger than `max_shard_bytes`), copying tokenizer files from `tokenizer_dir` if given."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    os.makedirs(out_dir, exist_ok=True)
    out_dtype = jnp.dtype(dtype or cfg.param_dtype)
    tensors: dict[str, np.ndarray] = {}
    for name, path, _, to_hf in mapping(cfg):
        leaf_path, layer, expert = _split_path(path)
        value = _get(params, leaf_path)
        if layer is not None:
            value = value[layer]
        if expert is not None:
            value = value[expert]
        tensors[name] = np.asarray(jax.device_get(to_hf(value)).astype(out_dtype))
    shards, current, size = [], {}, 0
    for name, array in tensors.items():
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = np.ascontiguousarray(array)
        size += array.nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(a.nbytes for a in tensors.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_config = to_hf_dict(cfg)
    hf_config["torch_dtype"] = hf_config["dtype"] = str(out_dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(out_dir, name))
    return out_dir
