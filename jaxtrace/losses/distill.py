"""Per-token distillation divergences from logits, and the all-token OPD (OPSD) loss.

All divergences are computed in float32 over the full vocabulary, per token: [..., V] -> [...].
The teacher is a constant (stop-gradient): in self-distillation it shares the student's weights,
and its gradient path must not train the policy to imitate its own privileged copy.
These materialise [tokens, V] logits; the routed, memory-aware op for training at scale is
`pallas_kernels.span_kl`, and `trace_loss` takes its per-token output.
"""

import jax
import jax.numpy as jnp

from jaxtrace.losses._reduce import check_2d, check_same_shape, reduce_tokens


def _log_probs(student_logits, teacher_logits):
    check_same_shape("student_logits", student_logits, teacher_logits=teacher_logits)
    if jnp.ndim(student_logits) < 1:
        raise ValueError(f"logits need a vocab axis, got shape {jnp.shape(student_logits)}")
    logp_s = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32), axis=-1)
    teacher = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
    logp_t = jax.nn.log_softmax(teacher, axis=-1)
    return logp_s, logp_t


def _kl(logp_p, logp_q):
    """KL(p || q) = sum_v p (log p - log q) over the last axis; 0 log 0 = 0 (masked vocab)."""
    p = jnp.exp(logp_p)
    # Inner where keeps -inf - (-inf) = NaN out of the graph; outer drops p = 0 entries.
    diff = jnp.where(p > 0, logp_p - logp_q, 0.0)
    return jnp.sum(jnp.where(p > 0, p * diff, 0.0), axis=-1)


def forward_kl(student_logits, teacher_logits):
    """KL(p_teacher || p_student) per token, [..., V] logits -> [...] float32 (mass covering)."""
    logp_s, logp_t = _log_probs(student_logits, teacher_logits)
    return _kl(logp_t, logp_s)


def reverse_kl(student_logits, teacher_logits):
    """KL(p_student || p_teacher) per token, [..., V] logits -> [...] float32 (mode seeking)."""
    logp_s, logp_t = _log_probs(student_logits, teacher_logits)
    return _kl(logp_s, logp_t)


def jsd(student_logits, teacher_logits, beta=0.5):
    """Generalised Jensen-Shannon divergence per token (GKD, Agarwal et al. 2024).

    JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta * p_t + (1 - beta) * p_s.
    beta = 0.5 is the symmetric JSD (bounded by log 2). beta must lie strictly in (0, 1): at the
    ends the divergence is identically 0 (use forward_kl / reverse_kl instead).

    Args: [..., V] student and teacher logits. Returns: [...] float32.
    """
    beta = float(beta)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    logp_s, logp_t = _log_probs(student_logits, teacher_logits)
    log_m = jnp.logaddexp(logp_t + jnp.log(beta), logp_s + jnp.log1p(-beta))
    return beta * _kl(logp_t, log_m) + (1.0 - beta) * _kl(logp_s, log_m)


def all_token_distill_loss(kl_BxT, mask_BxT, norm="token", *, max_len=None):
    """All-token on-policy (self-)distillation loss: the normalised sum of per-token KL.

    Args:
      kl_BxT: [B, T] per-token divergence (e.g. forward_kl, or `span_kl` with every response token
        routed to FKL).
      mask_BxT: [B, T] response tokens.
      norm: "token" (sum / #response tokens in the batch), "sequence" (mean per sequence, then over
        sequences with tokens) or "constant" (sum / (B * max_len)).
    Returns: scalar float32; 0 when the mask is empty.
    """
    check_2d("kl_BxT", kl_BxT)
    check_same_shape("kl_BxT", kl_BxT, mask_BxT=mask_BxT)
    return reduce_tokens(kl_BxT, mask_BxT, norm, max_len=max_len)
