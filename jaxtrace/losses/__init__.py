"""Losses: pure functions of arrays (log-probs, per-token KL, masks, routes); no model code.

grpo: group advantages and the clipped surrogate with GRPO / DAPO / Dr. GRPO presets.
distill: per-token FKL / RKL / JSD from logits and the all-token OPD loss.
trace: token routing, the KL-coefficient schedule and the routed TRACE loss (and baselines).
"""

from jaxtrace.losses.distill import all_token_distill_loss, forward_kl, jsd, reverse_kl
from jaxtrace.losses.grpo import (
    PRESETS,
    PGTerms,
    PolicyLossConfig,
    group_advantages,
    overlong_filter_mask,
    overlong_penalty,
    pg_metrics,
    policy_gradient_loss,
    policy_gradient_terms,
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
    "PRESETS",
    "PGTerms",
    "PolicyLossConfig",
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
    "reverse_kl",
    "routed_kl_from_logits",
    "routes_for_mode",
    "token_routes",
    "trace_loss",
]
