"""Group-relative policy-gradient losses: GRPO, DAPO and Dr. GRPO.

Shapes: N = B = number of responses (G responses per prompt, contiguous), T = padded response
length. Log-probs are of the sampled tokens under the current (`logp`), behaviour (`old_logp`) and
reference (`ref_logp`) policies.

References: DeepSeekMath (GRPO), DAPO (clip-higher, token-level norm, overlong shaping),
"Understanding R1-Zero-Like Training" (Dr. GRPO: no std scaling, constant length norm). The
settings each algorithm name implies (and the verl / TRL names they match) are in
`jaxtrace.algos`, the one table the trainer reads.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxtrace.losses._reduce import (
    check_2d,
    check_norm,
    check_same_shape,
    masked_mean,
    per_sequence_advantage,
    reduce_tokens,
    zero_outside,
)


def group_advantages(rewards_N, group_size, *, scale="std", eps=1e-6, ddof=1):
    """Group-relative advantages A_i = (r_i - mean_g r) / (std_g r + eps).

    Args:
      rewards_N: [N] rewards; groups are contiguous runs of `group_size` responses.
      group_size: G >= 2 (a static Python int); N must be a multiple of G.
      scale: "std" (GRPO/DAPO) divides by the group std; "none" (Dr. GRPO) only centres.
      eps: added to the std.
      ddof: std degrees of freedom: 1 = unbiased (default; torch.std, as verl's GRPO advantage
        and TRL's GRPOTrainer compute it), 0 = population std (x 1/1.069 at G = 8).

    Returns:
      adv_N: [N] float32; exactly 0 for every member of a zero-variance group.
      zero_variance_N: [N] bool, True for members of a group whose rewards are all equal
        (all-correct / all-wrong). Its mean is the fraction of zero-variance groups.
    """
    rewards_N = jnp.asarray(rewards_N, jnp.float32)
    if rewards_N.ndim != 1:
        raise ValueError(f"rewards_N must be 1-D [N], got shape {rewards_N.shape}")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    n = rewards_N.shape[0]
    if n == 0 or n % group_size:
        raise ValueError(
            f"rewards_N length {n} must be a positive multiple of group_size {group_size}"
        )
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof!r}")
    r_GxK = rewards_N.reshape(-1, group_size)
    centred_GxK = r_GxK - jnp.mean(r_GxK, axis=-1, keepdims=True)
    # Compare max with min rather than std with a tolerance: exact for {0, 1} rewards and free of
    # rounding in the mean (e.g. eight copies of 0.1).
    zero_var_G = jnp.max(r_GxK, axis=-1) == jnp.min(r_GxK, axis=-1)
    if scale == "std":
        std_G = jnp.std(r_GxK, axis=-1, ddof=ddof)
        adv_GxK = centred_GxK / (std_G[:, None] + eps)
    else:
        adv_GxK = centred_GxK
    adv_GxK = jnp.where(zero_var_G[:, None], 0.0, adv_GxK)
    zero_var_GxK = jnp.broadcast_to(zero_var_G[:, None], r_GxK.shape)
    return adv_GxK.reshape(n), zero_var_GxK.reshape(n)


class PGTerms(NamedTuple):
    """Per-token pieces of the clipped surrogate (all [B, T] float32)."""

    loss: jax.Array  # -min(ratio * A, clip(ratio) * A) [dual clip] + ref_kl_coef * ref_kl
    ratio: jax.Array  # exp(logp - old_logp)
    clipped_low: jax.Array  # 1.0 where A < 0 and ratio < 1 - eps_low (no gradient)
    clipped_high: jax.Array  # 1.0 where A > 0 and ratio > 1 + eps_high (no gradient)
    clipped_dual: jax.Array  # 1.0 where A < 0 and ratio > clip_ratio_c (dual clip; no gradient)
    approx_kl: jax.Array  # k3 estimate of KL(old || pi): ratio - 1 - log ratio
    ref_kl: jax.Array  # estimate of KL(pi || ref) (`ref_kl_estimator`); 0 without ref_logp


REF_KL_ESTIMATORS = ("k1", "k3")


def ref_kl_estimate(logp, ref_logp, estimator="k3"):
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman's k1 / k3).

    "k1": logp - ref_logp, unbiased, can be negative; its gradient is grad logp (verl "kl").
    "k3": exp(ref - logp) - (ref - logp) - 1, unbiased and >= 0 (verl "low_var_kl", TRL's
    beta term). Gradients flow through `logp` only.
    """
    if estimator not in REF_KL_ESTIMATORS:
        raise ValueError(f"ref KL estimator must be one of {REF_KL_ESTIMATORS}, got {estimator!r}")
    d = jax.lax.stop_gradient(jnp.asarray(ref_logp, jnp.float32)) - logp
    return -d if estimator == "k1" else jnp.exp(d) - d - 1.0


def policy_gradient_terms(
    logp_BxT,
    old_logp_BxT,
    adv_BxT,
    *,
    eps_low=0.2,
    eps_high=0.2,
    ref_logp_BxT=None,
    ref_kl_coef=0.0,
    ref_kl_estimator="k3",
    clip_ratio_c=0.0,
):
    """Per-token clipped PPO surrogate (no masking, no normalisation). See `PGTerms`.

    `adv_BxT` is [B, T] (broadcast a per-sequence advantage first). Gradients flow through
    `logp_BxT` only: `old_logp` and `ref_logp` are treated as constants.

    Dual clip (`clip_ratio_c` > 1, 0 = off; Ye et al. 2020, verl's `clip_ratio_c`): on tokens
    with A < 0 the clipped loss is capped at -clip_ratio_c * A, so a token whose ratio has run
    far above 1 under a negative advantage stops pushing (its gradient is 0).
    """
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low/eps_high must be >= 0, got {eps_low}, {eps_high}")
    if clip_ratio_c and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be 0 (off) or > 1, got {clip_ratio_c}")
    logp = jnp.asarray(logp_BxT, jnp.float32)
    old_logp = jax.lax.stop_gradient(jnp.asarray(old_logp_BxT, jnp.float32))
    adv = jax.lax.stop_gradient(jnp.asarray(adv_BxT, jnp.float32))
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    clipped_ratio = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -jnp.minimum(ratio * adv, clipped_ratio * adv)
    sg_ratio = jax.lax.stop_gradient(ratio)
    clipped_low = ((adv < 0) & (sg_ratio < 1.0 - eps_low)).astype(jnp.float32)
    clipped_high = ((adv > 0) & (sg_ratio > 1.0 + eps_high)).astype(jnp.float32)
    if clip_ratio_c:
        dual = (adv < 0) & (sg_ratio > clip_ratio_c)
        loss = jnp.where(dual, -clip_ratio_c * adv, loss)  # a constant: no gradient
        clipped_dual = dual.astype(jnp.float32)
    else:
        clipped_dual = jnp.zeros_like(loss)
    sg_log_ratio = jax.lax.stop_gradient(log_ratio)
    approx_kl = jnp.exp(sg_log_ratio) - 1.0 - sg_log_ratio
    if ref_logp_BxT is None:
        if ref_kl_coef:
            raise ValueError(f"ref_kl_coef={ref_kl_coef} needs ref_logp_BxT")
        ref_kl = jnp.zeros_like(loss)
    else:
        ref_kl = ref_kl_estimate(logp, ref_logp_BxT, ref_kl_estimator)
        loss = loss + ref_kl_coef * ref_kl
    return PGTerms(loss, ratio, clipped_low, clipped_high, clipped_dual, approx_kl, ref_kl)


def pg_metrics(terms, mask_BxT, count=None):
    """Clip fractions, approx KL, mean ratio and ref KL over the masked tokens (scalars).
    `count`: the whole batch's masked tokens when this is a micro-batch (`masked_mean`)."""
    sg = jax.tree.map(jax.lax.stop_gradient, terms)
    mean = lambda x: masked_mean(x, mask_BxT, count)  # noqa: E731
    low, high = mean(sg.clipped_low), mean(sg.clipped_high)
    return {
        "clip_frac_low": low,
        "clip_frac_high": high,
        "clip_frac": low + high,  # disjoint events: A < 0 vs A > 0
        "clip_frac_dual": mean(sg.clipped_dual),
        "approx_kl": mean(sg.approx_kl),
        "ratio_mean": mean(sg.ratio),
        "ref_kl": mean(sg.ref_kl),
    }


def policy_gradient_loss(
    logp_BxT,
    old_logp_BxT,
    adv_B,
    mask_BxT,
    *,
    eps_low=0.2,
    eps_high=0.2,
    ref_logp_BxT=None,
    ref_kl_coef=0.0,
    ref_kl_estimator="k3",
    clip_ratio_c=0.0,
    norm="token",
    max_len=None,
):
    """Clipped policy-gradient loss with GRPO / DAPO / Dr. GRPO normalisation.

    Per token: l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A) + ref_kl_coef * k3_t with
    r_t = exp(logp_t - old_logp_t). On-policy, pass old_logp = stop_gradient(logp): r = 1 and
    grad l_t = -A grad logp_t.

    Args:
      logp_BxT, old_logp_BxT: [B, T] log-probs of the sampled tokens.
      adv_B: [B] per-sequence advantages (or [B, T] per-token).
      mask_BxT: [B, T] response tokens that count (bool or 0/1).
      ref_logp_BxT: optional [B, T] reference-policy log-probs for the KL penalty
        (`ref_kl_estimator` "k3" or "k1", see `ref_kl_estimate`).
      clip_ratio_c: dual-clip constant (> 1), 0 = off.
      norm: "token" (DAPO: sum over all tokens / #tokens in the batch), "sequence" (GRPO: mean
        within each sequence, then over sequences with at least one token), "constant"
        (Dr. GRPO: sum / (B * max_len)).
      max_len: the constant of norm="constant" (a Python int; defaults to T).

    Returns:
      (loss scalar float32, metrics dict of float32 scalars: pg_loss, clip_frac_low,
      clip_frac_high, clip_frac, clip_frac_dual, approx_kl, ratio_mean, ref_kl, n_tokens).
      No valid tokens -> 0.
    """
    check_2d("logp_BxT", logp_BxT)
    check_same_shape(
        "logp_BxT",
        logp_BxT,
        old_logp_BxT=old_logp_BxT,
        mask_BxT=mask_BxT,
        ref_logp_BxT=ref_logp_BxT,
    )
    check_norm(norm)
    B, T = jnp.shape(logp_BxT)
    adv_BxT = per_sequence_advantage(adv_B, B, T)
    logp_BxT, old_logp_BxT, ref_logp_BxT = zero_outside(
        mask_BxT, logp_BxT, old_logp_BxT, ref_logp_BxT
    )
    terms = policy_gradient_terms(
        logp_BxT,
        old_logp_BxT,
        adv_BxT,
        eps_low=eps_low,
        eps_high=eps_high,
        ref_logp_BxT=ref_logp_BxT,
        ref_kl_coef=ref_kl_coef,
        ref_kl_estimator=ref_kl_estimator,
        clip_ratio_c=clip_ratio_c,
    )
    loss = reduce_tokens(terms.loss, mask_BxT, norm, max_len=max_len)
    metrics = pg_metrics(terms, mask_BxT)
    metrics["pg_loss"] = jax.lax.stop_gradient(loss)
    metrics["n_tokens"] = jnp.sum(jnp.asarray(mask_BxT, jnp.float32))
    return loss, metrics


def overlong_filter_mask(mask_BxT, truncated_B):
    """DAPO overlong filtering: drop every token of a truncated (unfinished) response.

    Args:
      mask_BxT: [B, T] response mask.
      truncated_B: [B] bool, True where the response hit the length limit without a stop token.
    Returns: [B, T] mask of the same dtype with the truncated rows zeroed.
    """
    check_2d("mask_BxT", mask_BxT)
    truncated_B = jnp.asarray(truncated_B)
    if truncated_B.shape != jnp.shape(mask_BxT)[:1]:
        raise ValueError(
            f"truncated_B must have shape ({jnp.shape(mask_BxT)[0]},), got {truncated_B.shape}"
        )
    mask_BxT = jnp.asarray(mask_BxT)
    return jnp.where(truncated_B[:, None], jnp.zeros_like(mask_BxT), mask_BxT)


def overlong_penalty(lengths, max_len, cache_len):
    """DAPO soft overlong punishment, added to the reward.

    With L = max_len and C = cache_len (the soft zone at the end):
        0                        if len <= L - C
        ((L - C) - len) / C      if L - C < len <= L   (linear from 0 down to -1)
        -1                       if len > L
    Args:
      lengths: [...] response lengths (ints or floats).
      max_len, cache_len: Python numbers, 0 <= cache_len <= max_len.
    Returns: [...] float32 penalties in [-1, 0].
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if not 0 <= cache_len <= max_len:
        raise ValueError(f"cache_len must be in [0, max_len={max_len}], got {cache_len}")
    lengths = jnp.asarray(lengths, jnp.float32)
    soft_start = float(max_len - cache_len)
    # cache_len == 0 is a hard cut-off: -1 only beyond max_len.
    ramp = (soft_start - lengths) / max(float(cache_len), 1.0)
    return jnp.where(lengths <= soft_start, 0.0, jnp.where(lengths <= max_len, ramp, -1.0))
