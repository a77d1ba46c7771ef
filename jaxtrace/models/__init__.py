"""Models: build, split into (graphdef, params) pytrees, apply functionally.

Params cross the jit boundary as plain nested dicts of arrays (`nnx.to_pure_dict`); the module
graph (`graphdef`) is static. `apply` merges them inside the traced function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrace.models.attention import AttentionMask, causal_mask, decode_mask, prefill_mask
from jaxtrace.models.config import ModelConfig, from_hf_dict, preset, to_hf_dict
from jaxtrace.models.qwen3 import (
    Qwen3,
    decode_loop_layout,
    grow_cache,
    init_cache,
    is_kv,
    pad_cache_slots,
    positions_from_valid,
    repeat_cache_rows,
    stack_cache,
    take_cache_rows,
    unstack_cache,
    unstack_layers,
    unstacked_decode,
)

__all__ = [
    "AttentionMask",
    "ModelConfig",
    "Qwen3",
    "abstract_model",
    "apply",
    "causal_mask",
    "create",
    "decode_loop_layout",
    "decode_mask",
    "forward_logits",
    "from_hf_dict",
    "grow_cache",
    "init_cache",
    "is_kv",
    "logical_axes",
    "pad_cache_slots",
    "positions_from_valid",
    "prefill_mask",
    "preset",
    "repeat_cache_rows",
    "stack_cache",
    "take_cache_rows",
    "unstack_cache",
    "unstack_layers",
    "unstacked_decode",
    "to_hf_dict",
]


def create(cfg: ModelConfig, seed: int = 0):
    """Returns (graphdef, params) of a randomly initialised model."""
    model = Qwen3(cfg, nnx.Rngs(params=seed))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def abstract_model(cfg: ModelConfig):
    """(graphdef, params as ShapeDtypeStruct) without allocating anything."""
    model = nnx.eval_shape(lambda: Qwen3(cfg, nnx.Rngs(params=0)))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def logical_axes(cfg: ModelConfig):
    """A params-shaped tree of logical axis-name tuples (one name per array dimension)."""
    model = nnx.eval_shape(lambda: Qwen3(cfg, nnx.Rngs(params=0)))
    state = nnx.state(model, nnx.Param)
    return nnx.to_pure_dict(
        jax.tree.map(
            lambda v: v.get_metadata()["logical_axes"],
            state,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    )


def apply(graphdef, params, tokens_BxT, positions_BxT, mask: AttentionMask, **kwargs):
    """Functional forward: (hidden [B, T, D], cache); kwargs go to `Qwen3.__call__`."""
    return nnx.merge(graphdef, params)(tokens_BxT, positions_BxT, mask, **kwargs)


def lm_head(graphdef, params):
    """The [D, V] output projection of a params tree."""
    return nnx.merge(graphdef, params).lm_head_weight()


def forward_logits(graphdef, params, tokens_BxT, valid_BxT=None):
    """Full-sequence float32 logits [B, T, V] for (optionally left-padded) token ids."""
    if valid_BxT is None:
        valid_BxT = jnp.ones(tokens_BxT.shape, bool)
    model = nnx.merge(graphdef, params)
    hidden, _ = model(tokens_BxT, positions_from_valid(valid_BxT), causal_mask(valid_BxT))
    return model.logits(hidden)
