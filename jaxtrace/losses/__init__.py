"""Losses: pure functions of arrays (log-probs, per-token KL, masks, routes); no model code.

grpo: group advantages and the clipped surrogate (GRPO / DAPO / Dr. GRPO normalisations).
distill: per-token FKL / RKL / JSD from logits and the all-token OPD loss.
trace: token routing, the KL-coefficient schedule and the routed TRACE loss (and baselines).
"""

from jaxtrace.losses.distill import all_token_distill_loss, forward_kl, jsd, reverse_kl
from jaxtrace.losses.grpo import (
    REF_KL_ESTIMATORS,
    PGTerms,
    group_advantages,
    overlong_filter_mask,
    overlong_penalty,
    pg_metrics,
    policy_gradient_loss,
    policy_gradient_terms,
    ref_kl_estimate,
)
from jaxtrace.losses.trace import (
    MODES,
    ROUTE_FKL,
    ROUTE_GRPO,
    ROUTE_IGNORE,
    ROUTE_RKL,
    kl_coef,
    routed_kl_from_logits,
    routes_for_mode,
    token_routes,
    trace_loss,
)

__all__ = [
    "MODES",
    "PGTerms",
    "REF_KL_ESTIMATORS",
    "ROUTE_FKL",
    "ROUTE_GRPO",
    "ROUTE_IGNORE",
    "ROUTE_RKL",
    "all_token_distill_loss",
    "forward_kl",
    "group_advantages",
    "jsd",
    "kl_coef",
    "overlong_filter_mask",
    "overlong_penalty",
    "pg_metrics",
    "policy_gradient_loss",
    "policy_gradient_terms",
    "ref_kl_estimate",
    "reverse_kl",
    "routed_kl_from_logits",
    "routes_for_mode",
    "token_routes",
    "trace_loss",
]
