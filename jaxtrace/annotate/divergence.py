"""Automatic spans, no prompt: the tokens where teacher and student diverge most.

Token-level, so no text or offsets are involved: pass the per-token divergence the trainer
already has (e.g. KL(teacher || student) per response position) and get a token mask.
`divergence_mask` is jnp and jittable (the selection sizes are static Python numbers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrace.annotate.spans import token_mask_to_spans

# k = ceil(top_frac * n) with this slack, so float rounding (0.1 * 30 = 3.0000001) adds no token.
_FRAC_SLACK = 1e-4


def _check_args(top_k, top_frac, merge_gap) -> None:
    if (top_k is None) == (top_frac is None):
        raise ValueError(f"give exactly one of top_k and top_frac, got {top_k=}, {top_frac=}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if top_frac is not None and not (isinstance(top_frac, int | float) and 0.0 <= top_frac <= 1.0):
        raise ValueError(f"top_frac must be in [0, 1], got {top_frac!r}")
    if not (isinstance(merge_gap, int) and merge_gap >= 0):
        raise ValueError(f"merge_gap must be an int >= 0, got {merge_gap!r}")


def divergence_mask(
    kl_BxT,
    mask_BxT=None,
    *,
    top_k: int | None = None,
    top_frac: float | None = None,
    merge_gap: int = 0,
) -> jax.Array:
    """bool[..., T]: the top tokens by divergence per row, with short gaps between them filled.

    Args:
      kl_BxT: float[..., T] per-token divergence (any leading batch dims). NaN never selects.
      mask_BxT: bool[..., T] response tokens (False = prompt/padding); default all True.
      top_k: select the k highest-divergence valid tokens of each row (fewer if fewer valid).
      top_frac: or select ceil(top_frac * #valid) of them per row.
      merge_gap: then also mark valid tokens in any run of <= merge_gap unselected tokens
        lying between two selected tokens of the same row, turning nearby picks into spans.

    Ties are broken toward the earlier position.
    """
    _check_args(top_k, top_frac, merge_gap)
    kl_BxT = jnp.asarray(kl_BxT, jnp.float32)
    if kl_BxT.ndim < 1:
        raise ValueError(f"kl_BxT must have at least 1 dim, got shape {kl_BxT.shape}")
    if mask_BxT is None:
        mask_BxT = jnp.ones(kl_BxT.shape, bool)
    mask_BxT = jnp.asarray(mask_BxT, bool)
    if mask_BxT.shape != kl_BxT.shape:
        raise ValueError(f"mask_BxT shape {mask_BxT.shape} != kl_BxT shape {kl_BxT.shape}")
    T = kl_BxT.shape[-1]
    valid = mask_BxT & ~jnp.isnan(kl_BxT)
    score = jnp.where(valid, kl_BxT, -jnp.inf)
    order = jnp.argsort(-score, axis=-1, stable=True)  # descending, earlier index first on ties
    rank = jnp.argsort(order, axis=-1, stable=True)
    n_valid = valid.sum(-1, keepdims=True)
    if top_k is not None:
        k = jnp.minimum(top_k, n_valid)
    else:
        k = jnp.ceil(top_frac * n_valid.astype(jnp.float32) - _FRAC_SLACK).astype(jnp.int32)
    picked = valid & (rank < k)
    if merge_gap == 0 or T == 0:
        return picked
    pos = jnp.broadcast_to(jnp.arange(T), kl_BxT.shape)
    prev_pick = jax.lax.cummax(jnp.where(picked, pos, -1), axis=pos.ndim - 1)
    next_pick = jax.lax.cummin(jnp.where(picked, pos, T), axis=pos.ndim - 1, reverse=True)
    between = (prev_pick >= 0) & (next_pick < T) & (next_pick - prev_pick - 1 <= merge_gap)
    return picked | (between & mask_BxT)


def divergence_spans(
    kl_T,
    mask_T=None,
    *,
    top_k: int | None = None,
    top_frac: float | None = None,
    merge_gap: int = 0,
    min_span_tokens: int = 1,
) -> list[tuple[int, int]]:
    """Token spans [start, end) of `divergence_mask` for one sequence; shorter ones dropped."""
    kl_T = np.asarray(kl_T)
    if kl_T.ndim != 1:
        raise ValueError(f"kl_T must be 1-D, got shape {kl_T.shape}")
    if not (isinstance(min_span_tokens, int) and min_span_tokens >= 1):
        raise ValueError(f"min_span_tokens must be an int >= 1, got {min_span_tokens!r}")
    picked_T = divergence_mask(kl_T, mask_T, top_k=top_k, top_frac=top_frac, merge_gap=merge_gap)
    spans = token_mask_to_spans(np.asarray(picked_T))
    return [(a, b) for a, b in spans if b - a >= min_span_tokens]
