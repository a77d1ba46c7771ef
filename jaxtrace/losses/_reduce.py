"""Shared checks and token reductions for the losses (private).

Every loss here is a weighted sum of per-token terms divided by a denominator that depends on the
normalisation mode. The denominators are clamped at 1 so that a batch with no valid tokens gives a
loss of exactly 0 (and a zero gradient) instead of NaN.

Micro-batching (jaxtrace.microbatch): a loss normalised over the whole batch is the sum of its
micro-batches' losses when each is divided by the whole batch's denominators, computed up front
from the batch's masks (`batch_totals`) and passed as `totals=`; without `totals` the
denominators are this batch's own, so the two paths share one piece of math.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

NORMS = ("token", "sequence", "constant")


def check_norm(norm, allowed=NORMS):
    if norm not in allowed:
        raise ValueError(f"norm must be one of {allowed}, got {norm!r}")


def check_same_shape(ref_name, ref, **others):
    """Raise ValueError naming the first array in `others` whose shape differs from `ref`."""
    for name, x in others.items():
        if x is not None and jnp.shape(x) != jnp.shape(ref):
            raise ValueError(
                f"{name} must have the shape of {ref_name} {jnp.shape(ref)}, got {jnp.shape(x)}"
            )


def check_2d(name, x):
    if jnp.ndim(x) != 2:
        raise ValueError(f"{name} must be 2-D [B, T], got shape {jnp.shape(x)}")


def per_sequence_advantage(adv, B, T):
    """[B] or [B, T] advantages -> [B, T] float32 (a per-sequence advantage is broadcast)."""
    adv = jnp.asarray(adv, jnp.float32)
    if adv.shape == (B,):
        return jnp.broadcast_to(adv[:, None], (B, T))
    if adv.shape == (B, T):
        return adv
    raise ValueError(f"adv must have shape ({B},) or ({B}, {T}), got {adv.shape}")


def safe_div(num, den):
    """num / den with den clamped to >= 1: zero valid tokens -> 0, never NaN."""
    return num / jnp.maximum(den, 1.0)


class Totals(NamedTuple):
    """The denominators of `reduce_tokens` over a whole batch (float32 scalars, rows an int)."""

    tokens: jax.Array  # denominator tokens ("token" norm)
    sequences: jax.Array  # rows with at least one denominator token ("sequence" norm)
    rows: int  # rows ("constant" norm: rows * max_len)


def batch_totals(denom_mask_BxT) -> Totals:
    """`Totals` of a [B, T] denominator mask (bool or 0/1)."""
    denom = jnp.asarray(denom_mask_BxT, jnp.float32)
    n_B = jnp.sum(denom, axis=-1)
    return Totals(jnp.sum(n_B), jnp.sum((n_B > 0).astype(jnp.float32)), jnp.shape(denom)[0])


def reduce_tokens(values_BxT, mask_BxT, norm, *, denom_mask_BxT=None, max_len=None, totals=None):
    """Normalised sum of `values_BxT * mask_BxT`.

    Args:
      values_BxT: per-token terms (float).
      mask_BxT: which tokens contribute to the numerator (bool or 0/1).
      norm: "token": sum / (#denominator tokens in the batch) (DAPO);
        "sequence": per sequence sum / (#denominator tokens of that sequence), then the mean over
        sequences that have at least one denominator token (GRPO);
        "constant": sum / (B * max_len) (Dr. GRPO); max_len defaults to T.
      denom_mask_BxT: tokens counted in the denominator; defaults to `mask_BxT`. TRACE passes all
        response tokens here while each route sums only its own tokens.
      max_len: the constant of the "constant" norm.
      totals: the whole batch's `Totals` when this is one micro-batch of it (the result is then
        this micro-batch's share of the whole batch's loss); default: this batch's own.

    Returns:
      Scalar float32.
    """
    check_norm(norm)
    mask = jnp.asarray(mask_BxT, jnp.float32)
    denom = mask if denom_mask_BxT is None else jnp.asarray(denom_mask_BxT, jnp.float32)
    totals = batch_totals(denom) if totals is None else totals
    # where (not multiply) so that a NaN/inf in a masked-out slot cannot leak into the sum.
    contrib = jnp.where(mask > 0, jnp.asarray(values_BxT, jnp.float32) * mask, 0.0)
    if norm == "token":
        return safe_div(jnp.sum(contrib), totals.tokens)
    if norm == "sequence":
        per_seq_B = safe_div(jnp.sum(contrib, axis=-1), jnp.sum(denom, axis=-1))
        # Sequences without any valid token (padding rows, overlong-filtered rows) are left out of
        # the mean so they do not dilute the others.
        return safe_div(jnp.sum(per_seq_B), totals.sequences)
    T = jnp.shape(contrib)[1]
    if max_len is None:
        max_len = T
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    return jnp.sum(contrib) / (totals.rows * float(max_len))


def masked_mean(x_BxT, mask_BxT, count=None):
    """Mean of x over the masked tokens; 0 when there are none (metrics). `count`: the whole
    batch's number of masked tokens when this is a micro-batch (its share of the mean)."""
    mask = jnp.asarray(mask_BxT, jnp.float32)
    total = jnp.sum(jnp.where(mask > 0, jnp.asarray(x_BxT, jnp.float32) * mask, 0.0))
    return safe_div(total, jnp.sum(mask) if count is None else count)


def zero_outside(mask_BxT, *arrays):
    """Replace entries outside the mask by 0 (None stays None).

    Padding slots may hold junk (-inf log-probs); a `where` on the inputs gives them an exactly
    zero gradient, whereas masking only the output would give 0 * inf = NaN in the backward pass.
    """
    keep = jnp.asarray(mask_BxT) > 0
    return tuple(
        None if x is None else jnp.where(keep, jnp.asarray(x, jnp.float32), 0.0) for x in arrays
    )
