"""TRACE: token routing, the KL-coefficient schedule, and the routed loss.

Each response token gets one route (int32): FKL on key spans of correct rollouts, optionally RKL
on error spans of wrong rollouts, GRPO on every other response token, IGNORE on prompt/padding.
The loss takes the per-token KL already computed by the KL op (`pallas_kernels.span_kl`, any
implementation) so it knows nothing of models or kernels:

    L = L_GRPO(GRPO tokens) + lam * [L_FKL(FKL tokens) + L_RKL(RKL tokens)]

The same function gives the baselines: mode="grpo" (no KL), "opsd" (KL on every response token,
no GRPO) and "opsd+grpo" (KL and GRPO on every response token).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxtrace.losses._reduce import (
    Totals,
    batch_totals,
    check_2d,
    check_norm,
    check_same_shape,
    masked_mean,
    per_sequence_advantage,
    reduce_tokens,
    zero_outside,
)
from jaxtrace.losses.grpo import pg_metrics, policy_gradient_terms

# KL-op routes 0/1/2 (pallas_kernels.span_kl: none / forward / reverse) plus IGNORE, which the op
# treats as "none" like GRPO. Keep these equal to the op's constants (checked in the tests).
ROUTE_IGNORE = -1
ROUTE_GRPO = 0
ROUTE_FKL = 1
ROUTE_RKL = 2

MODES = ("trace", "grpo", "opsd", "opsd+grpo")
DECAYS = ("linear", "cosine", "constant")


def _bool(name, x, shape):
    x = jnp.asarray(x)
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
    return x.astype(bool)


def token_routes(
    response_mask_BxT,
    key_mask_BxT=None,
    error_mask_BxT=None,
    correct_B=None,
    *,
    fkl_on_key_spans=True,
    rkl_on_error_spans=False,
):
    """Route every token: [B, T] masks -> route_BxT int32.

    Truth table for a token (anything outside the response mask is IGNORE):
        correct & key span  & fkl_on_key_spans   -> FKL
        wrong   & error span & rkl_on_error_spans -> RKL
        any other response token                  -> GRPO
    Key spans of wrong rollouts and error spans of correct ones are GRPO (annotators should not
    produce them; this keeps a mislabelled span from pulling a token towards the teacher).

    Args:
      response_mask_BxT: [B, T] response tokens (bool or 0/1).
      key_mask_BxT, error_mask_BxT: [B, T] token-level span masks, or None (no spans).
      correct_B: [B] verifier verdicts (bool or reward > 0); needed when any span mask is given.
      fkl_on_key_spans, rkl_on_error_spans: the routed actions (per base model, see TRACE.md).
    """
    check_2d("response_mask_BxT", response_mask_BxT)
    shape = jnp.shape(response_mask_BxT)
    resp = _bool("response_mask_BxT", response_mask_BxT, shape)
    if correct_B is None:
        if key_mask_BxT is not None or error_mask_BxT is not None:
            raise ValueError("correct_B is required when key_mask_BxT or error_mask_BxT is given")
        correct = jnp.zeros(shape[:1], bool)
    else:
        correct = _bool("correct_B", correct_B, shape[:1])
    key = (
        jnp.zeros(shape, bool)
        if key_mask_BxT is None
        else _bool("key_mask_BxT", key_mask_BxT, shape)
    )
    err = (
        jnp.zeros(shape, bool)
        if error_mask_BxT is None
        else _bool("error_mask_BxT", error_mask_BxT, shape)
    )
    fkl = resp & key & correct[:, None] & fkl_on_key_spans
    rkl = resp & err & ~correct[:, None] & rkl_on_error_spans
    route = jnp.where(resp, ROUTE_GRPO, ROUTE_IGNORE)
    route = jnp.where(fkl, ROUTE_FKL, route)
    route = jnp.where(rkl, ROUTE_RKL, route)
    return route.astype(jnp.int32)


def routes_for_mode(route_BxT, mode, *, opsd_route=ROUTE_FKL):
    """The routes a mode actually uses (feed these to the KL op).

    "trace": unchanged; "grpo": every response token GRPO; "opsd" / "opsd+grpo": every response
    token `opsd_route` (FKL or RKL). IGNORE stays IGNORE.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if opsd_route not in (ROUTE_FKL, ROUTE_RKL):
        raise ValueError(f"opsd_route must be ROUTE_FKL or ROUTE_RKL, got {opsd_route!r}")
    route_BxT = jnp.asarray(route_BxT, jnp.int32)
    if mode == "trace":
        return route_BxT
    fill = ROUTE_GRPO if mode == "grpo" else opsd_route
    return jnp.where(route_BxT == ROUTE_IGNORE, ROUTE_IGNORE, fill).astype(jnp.int32)


def kl_coef(step, *, lambda0, warmup_steps, decay_steps, decay="linear"):
    """KL coefficient lambda(step): lambda0 for `warmup_steps`, then down to 0 over `decay_steps`.

    With p = clip((step - warmup_steps) / decay_steps, 0, 1):
        "linear":   lambda0 * (1 - p)
        "cosine":   lambda0 * (1 + cos(pi p)) / 2
        "constant": lambda0 for ever (the no-annealing ablation; decay_steps is ignored)
    So lambda(0 .. warmup_steps) = lambda0 and lambda(>= warmup_steps + decay_steps) = 0, never
    negative. decay_steps = 0 is a step function: lambda0 before warmup_steps, 0 from it on.
    `step` may be a traced integer; the other arguments are Python numbers.
    Returns: float32 scalar array.
    """
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if not (lambda0 >= 0 and math.isfinite(lambda0)):
        raise ValueError(f"lambda0 must be finite and >= 0, got {lambda0}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if decay_steps < 0:
        raise ValueError(f"decay_steps must be >= 0, got {decay_steps}")
    step = jnp.asarray(step, jnp.float32)
    lam0 = jnp.float32(lambda0)
    if decay == "constant":
        return jnp.broadcast_to(lam0, step.shape)
    if decay_steps == 0:
        return jnp.where(step < warmup_steps, lam0, jnp.float32(0.0))
    p = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    if decay == "linear":
        frac = 1.0 - p
    else:
        frac = 0.5 * (1.0 + jnp.cos(jnp.pi * p))
    # cos(pi) rounds to -1 + tiny in float32; clamp so the result is never negative.
    return jnp.maximum(lam0 * frac, 0.0)


def routed_kl_from_logits(student_logits_BxTxV, teacher_logits_BxTxV, route_BxT):
    """Per-token routed KL [B, T] with the reference op (materialises the logits; tests, CPU).

    IGNORE and GRPO tokens give 0, FKL tokens KL(teacher || student), RKL tokens
    KL(student || teacher); float32, teacher stop-gradient.
    """
    # Imported here so the losses stay importable whatever state the kernel package is in.
    from pallas_kernels.span_kl.reference import span_kl_from_logits

    if jnp.ndim(student_logits_BxTxV) != 3:
        raise ValueError(
            f"student_logits_BxTxV must be 3-D [B, T, V], got {jnp.shape(student_logits_BxTxV)}"
        )
    check_same_shape(
        "student_logits_BxTxV", student_logits_BxTxV, teacher_logits_BxTxV=teacher_logits_BxTxV
    )
    B, T, V = jnp.shape(student_logits_BxTxV)
    check_same_shape("logits[..., 0]", jnp.zeros((B, T)), route_BxT=route_BxT)
    op_route = jnp.where(jnp.asarray(route_BxT) == ROUTE_IGNORE, ROUTE_GRPO, route_BxT)
    kl = span_kl_from_logits(
        student_logits_BxTxV.reshape(B * T, V),
        teacher_logits_BxTxV.reshape(B * T, V),
        op_route.reshape(B * T),
    )
    return kl.reshape(B, T)


class TraceTotals(NamedTuple):
    """The whole batch's denominators of `trace_loss` (see `trace_totals`)."""

    response: Totals  # the loss's: response tokens (route != IGNORE)
    grpo: jax.Array  # tokens trained by the surrogate (the clip / ratio metrics')
    fkl: jax.Array  # FKL tokens (kl_fkl_mean's)
    rkl: jax.Array  # RKL tokens (kl_rkl_mean's)


def _route_masks(route_BxT, lam, mode, grpo_when_lam_zero):
    """(response, grpo, fkl, rkl) [B, T] bool masks of `trace_loss` from the mode's routes
    (`routes_for_mode`) and lam (float32 scalar)."""
    resp = route_BxT != ROUTE_IGNORE
    fkl = route_BxT == ROUTE_FKL
    rkl = route_BxT == ROUTE_RKL
    kl_tok = fkl | rkl
    if mode == "opsd+grpo":
        grpo = resp
    elif mode == "trace" and grpo_when_lam_zero:
        grpo = (route_BxT == ROUTE_GRPO) | (kl_tok & (lam == 0))
    else:
        grpo = route_BxT == ROUTE_GRPO
    return resp, grpo, fkl, rkl


def trace_totals(
    route_BxT, lam, *, mode="trace", opsd_route=ROUTE_FKL, grpo_when_lam_zero=True
) -> TraceTotals:
    """`TraceTotals` of a whole batch's [B, T] routes, for `trace_loss(..., totals=)` on each
    of its micro-batches (same mode / lam / opsd_route / grpo_when_lam_zero as the loss)."""
    lam = jnp.asarray(0.0 if lam is None else lam, jnp.float32)
    route = routes_for_mode(route_BxT, mode, opsd_route=opsd_route)
    resp, grpo, fkl, rkl = _route_masks(route, lam, mode, grpo_when_lam_zero)
    count = lambda m: jnp.sum(m.astype(jnp.float32))  # noqa: E731
    return TraceTotals(batch_totals(resp), count(grpo), count(fkl), count(rkl))


def trace_loss(
    logp_BxT,
    old_logp_BxT,
    adv_B,
    route_BxT,
    kl_BxT,
    lam,
    *,
    eps_low=0.2,
    eps_high=0.2,
    ref_logp_BxT=None,
    ref_kl_coef=0.0,
    ref_kl_estimator="k3",
    clip_ratio_c=0.0,
    norm="token",
    max_len=None,
    mode="trace",
    opsd_route=ROUTE_FKL,
    grpo_when_lam_zero=True,
    totals=None,
):
    """Token-routed loss: L = L_GRPO(GRPO tokens) + lam * [L_FKL(FKL tokens) + L_RKL(RKL tokens)].

    Normalisation. Both terms share one denominator, the number of *response* tokens
    (route != IGNORE), not the number of tokens of their own route:
      norm="token" (default, DAPO-style): L = (sum_{t GRPO} l_pg + lam sum_{t KL} kl) / N_resp,
        N_resp = response tokens in the whole batch;
      norm="sequence": the same per sequence with that sequence's N_resp, then the mean over
        sequences that have response tokens;
      norm="constant" (Dr. GRPO): divide by B * max_len.
    Why the shared denominator: every response token then carries the same weight, whichever
    route it got, so routing more tokens to KL does not inflate the weight of the remaining GRPO
    tokens (a per-route mean would), and with no KL tokens the loss is exactly the DAPO / GRPO
    loss of `policy_gradient_loss` with the same norm.

    Annealing. With grpo_when_lam_zero (default) and lam == 0 in mode "trace", the KL-routed
    tokens fall back to GRPO, so after the schedule ends training is plain GRPO on every response
    token, as TRACE.md says (instead of the routed tokens getting no gradient at all).

    Args:
      logp_BxT, old_logp_BxT: [B, T] log-probs of the sampled tokens (on-policy:
        old_logp = stop_gradient(logp)).
      adv_B: [B] GRPO advantages (or [B, T]).
      route_BxT: [B, T] int routes (ROUTE_*), e.g. from `token_routes`.
      kl_BxT: [B, T] per-token KL from the KL op, computed with `routes_for_mode(route, mode)`
        (only read on FKL/RKL tokens). May be None in mode "grpo".
      lam: KL coefficient (Python float or traced scalar), e.g. `kl_coef(step, ...)`.
      eps_low, eps_high, ref_logp_BxT, ref_kl_coef, ref_kl_estimator, clip_ratio_c: as
        `policy_gradient_loss` (the reference KL applies to the GRPO tokens).
      mode: "trace" | "grpo" | "opsd" (KL on every response token, no GRPO) | "opsd+grpo".
      opsd_route: ROUTE_FKL or ROUTE_RKL, the KL used on every response token in the opsd modes.
      totals: when this [B, T] batch is one micro-batch of a larger one, that batch's
        `trace_totals`: the loss and every metric but `lambda` are then this micro-batch's
        share, and summing them over the micro-batches gives the whole batch's values (counts
        and exposure add up as they are). Default: this batch's own.

    Returns:
      (loss, metrics) with float32 scalar metrics: loss, pg_loss, kl_loss (loss = pg_loss +
      lam * kl_loss), n_response_tokens, frac_grpo / frac_fkl / frac_rkl (of response tokens;
      frac_grpo counts every token trained by the surrogate, so in "opsd+grpo" or after the
      lam == 0 fallback the three can sum past 1),
      n_fkl_tokens, n_rkl_tokens, n_kl_tokens, kl_fkl_mean, kl_rkl_mean, lambda,
      exposure (= lam * n_kl_tokens; the trainer sums it over steps), clip_frac_low,
      clip_frac_high, clip_frac, clip_frac_dual, approx_kl, ratio_mean, ref_kl (over the GRPO
      tokens).
      No response tokens -> loss 0, no NaN.
    """
    check_2d("logp_BxT", logp_BxT)
    check_same_shape(
        "logp_BxT",
        logp_BxT,
        old_logp_BxT=old_logp_BxT,
        route_BxT=route_BxT,
        kl_BxT=kl_BxT,
        ref_logp_BxT=ref_logp_BxT,
    )
    check_norm(norm)
    route = routes_for_mode(route_BxT, mode, opsd_route=opsd_route)
    if kl_BxT is None and mode != "grpo":
        raise ValueError(f"kl_BxT is required in mode {mode!r}")
    if isinstance(lam, int | float) and not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be finite and >= 0, got {lam}")
    B, T = jnp.shape(logp_BxT)
    lam = jnp.asarray(0.0 if lam is None else lam, jnp.float32)
    adv_BxT = per_sequence_advantage(adv_B, B, T)

    resp, grpo, fkl, rkl = _route_masks(route, lam, mode, grpo_when_lam_zero)
    kl_tok = fkl | rkl
    if totals is None:
        totals = trace_totals(
            route_BxT, lam, mode=mode, opsd_route=opsd_route, grpo_when_lam_zero=grpo_when_lam_zero
        )

    logp_BxT, old_logp_BxT, ref_logp_BxT = zero_outside(grpo, logp_BxT, old_logp_BxT, ref_logp_BxT)
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
    # where (not multiply): values on tokens outside a route (padding junk) never reach the sum.
    pg_BxT = jnp.where(grpo, terms.loss, 0.0)
    kl_BxT = jnp.zeros((B, T), jnp.float32) if kl_BxT is None else jnp.asarray(kl_BxT, jnp.float32)
    kl_BxT = jnp.where(kl_tok, kl_BxT, 0.0)
    pg_loss = reduce_tokens(pg_BxT, resp, norm, max_len=max_len, totals=totals.response)
    kl_loss = reduce_tokens(kl_BxT, resp, norm, max_len=max_len, totals=totals.response)
    loss = pg_loss + lam * kl_loss

    sg_kl = jax.lax.stop_gradient(kl_BxT)
    n_resp = jnp.sum(resp.astype(jnp.float32))
    n_fkl = jnp.sum(fkl.astype(jnp.float32))
    n_rkl = jnp.sum(rkl.astype(jnp.float32))
    n_grpo = jnp.sum(grpo.astype(jnp.float32))
    n_resp_all = jnp.maximum(totals.response.tokens, 1.0)
    metrics = pg_metrics(terms, grpo, totals.grpo)
    metrics.update(
        loss=jax.lax.stop_gradient(loss),
        pg_loss=jax.lax.stop_gradient(pg_loss),
        kl_loss=jax.lax.stop_gradient(kl_loss),
        n_response_tokens=n_resp,
        frac_grpo=n_grpo / n_resp_all,
        frac_fkl=n_fkl / n_resp_all,
        frac_rkl=n_rkl / n_resp_all,
        n_fkl_tokens=n_fkl,
        n_rkl_tokens=n_rkl,
        n_kl_tokens=n_fkl + n_rkl,
        kl_fkl_mean=masked_mean(sg_kl, fkl, totals.fkl),
        kl_rkl_mean=masked_mean(sg_kl, rkl, totals.rkl),
        exposure=jax.lax.stop_gradient(lam) * (n_fkl + n_rkl),
    )
    metrics["lambda"] = jax.lax.stop_gradient(lam)
    return loss, metrics
