"""Span-routed KL from full logits: the definition of truth for `span_kl`.

Per token t with route r_t:
    r_t == ROUTE_NONE (0): 0
    r_t == ROUTE_FKL  (1): KL(p_teacher || p_student) = sum_v p_t (log p_t - log p_s)
    r_t == ROUTE_RKL  (2): KL(p_student || p_teacher) = sum_v p_s (log p_s - log p_t)
The teacher is a constant (stop-gradient). Everything is computed in float32.
"""

import jax
import jax.numpy as jnp

ROUTE_NONE = 0
ROUTE_FKL = 1
ROUTE_RKL = 2


def span_kl_from_logits(student_logits_TxV, teacher_logits_TxV, route_T):
    """Per-token routed KL [T] (float32) from student and teacher logits [T, V]."""
    logp_s = jax.nn.log_softmax(student_logits_TxV.astype(jnp.float32), axis=-1)
    logp_t = jax.nn.log_softmax(
        jax.lax.stop_gradient(teacher_logits_TxV).astype(jnp.float32), axis=-1
    )
    fkl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
    rkl = jnp.sum(jnp.exp(logp_s) * (logp_s - logp_t), axis=-1)
    return jnp.where(route_T == ROUTE_FKL, fkl, jnp.where(route_T == ROUTE_RKL, rkl, 0.0))


def span_kl(h_student_TxD, w_DxV, route_T, *, h_teacher_TxD=None, teacher_logits_TxV=None):
    """Reference op from hidden states: materialises [T, V] logits for both models."""
    student_logits = jnp.dot(h_student_TxD, w_DxV, preferred_element_type=jnp.float32)
    if teacher_logits_TxV is None:
        if h_teacher_TxD is None:
            raise ValueError("span_kl needs h_teacher_TxD or teacher_logits_TxV")
        teacher_logits_TxV = jnp.dot(h_teacher_TxD, w_DxV, preferred_element_type=jnp.float32)
    return span_kl_from_logits(student_logits, teacher_logits_TxV, route_T)


def token_logprobs(h_TxD, w_DxV, targets_T):
    """Reference (log p(target) [T], entropy [T]) in float32, materialising [T, V] logits."""
    logits = jnp.dot(h_TxD, w_DxV, preferred_element_type=jnp.float32)
    logp_TxV = jax.nn.log_softmax(logits, axis=-1)
    logp_T = jnp.take_along_axis(logp_TxV, targets_T[:, None].astype(jnp.int32), axis=-1)[:, 0]
    entropy_T = -jnp.sum(jnp.exp(logp_TxV) * logp_TxV, axis=-1)
    return logp_T, entropy_T
