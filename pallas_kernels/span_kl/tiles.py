"""Per-tile math shared by the XLA driver and the Pallas kernels.

A tile is a [bt, bv] block of logits (bt tokens x bv vocabulary entries). Per-token running
state is kept as [bt, 1] float32 columns so the same code runs inside TPU kernels (which want
2-D values) and in plain XLA. `valid_1xV` masks vocabulary columns past the end of the array
(Pallas edge blocks hold garbage there); the XLA driver never has such columns and passes None.

Online log-sum-exp: for a running max m and sum z = sum_v exp(x_v - m), a new tile moves the
max to m' and rescales z by exp(m - m'). Weighted sums a = sum_v exp(x_v - m) * f_v are
rescaled the same way, so exact expectations E_p[f] = a / z come out after the last tile.
"""

import jax.numpy as jnp

from pallas_kernels.span_kl.reference import ROUTE_FKL, ROUTE_RKL

# Finite stand-in for -inf: keeps exp(m - m') and 0 * (x - m) free of NaN on masked columns.
NEG = -1e30
KL_STATE = 6  # m_s, z_s, a_s, m_t, z_t, a_t
LOGP_STATE = 4  # m, z, a (= sum exp(s - m) * (s - m)), target logit


def _mask(x_TxV, valid_1xV):
    return x_TxV if valid_1xV is None else jnp.where(valid_1xV, x_TxV, NEG)


def _online(m_Tx1, z_Tx1, a_Tx1, x_TxV, f_TxV):
    """One online-softmax step: returns updated (m, z, a) with a = sum exp(x - m) * f."""
    m_new = jnp.maximum(m_Tx1, jnp.max(x_TxV, axis=-1, keepdims=True))
    alpha = jnp.exp(m_Tx1 - m_new)
    e_TxV = jnp.exp(x_TxV - m_new)
    z_new = z_Tx1 * alpha + jnp.sum(e_TxV, axis=-1, keepdims=True)
    a_new = a_Tx1 * alpha + jnp.sum(e_TxV * f_TxV, axis=-1, keepdims=True)
    return m_new, z_new, a_new


def kl_init(shape):
    """Initial running state for `kl_update`, each entry of `shape` (e.g. (bt, 1))."""
    neg, zero = jnp.full(shape, NEG, jnp.float32), jnp.zeros(shape, jnp.float32)
    return (neg, zero, zero, neg, zero, zero)


def kl_update(state, s_TxV, t_TxV, valid_1xV=None):
    """Fold one tile of student logits s and teacher logits t into the running KL state."""
    m_s, z_s, a_s, m_t, z_t, a_t = state
    s_TxV, t_TxV = _mask(s_TxV, valid_1xV), _mask(t_TxV, valid_1xV)
    diff_TxV = s_TxV - t_TxV  # 0 on masked columns (NEG - NEG)
    m_s, z_s, a_s = _online(m_s, z_s, a_s, s_TxV, diff_TxV)
    m_t, z_t, a_t = _online(m_t, z_t, a_t, t_TxV, -diff_TxV)
    return (m_s, z_s, a_s, m_t, z_t, a_t)


def kl_finalize(state, route_Tx1):
    """Running state -> (kl, lse_s, lse_t), each [bt, 1] float32; kl is 0 where route is 0.

    FKL = E_q[t - s] + lse_s - lse_t and RKL = E_p[s - t] + lse_t - lse_s: both expectations
    are of logit differences, so large absolute logits do not cancel catastrophically.
    """
    m_s, z_s, a_s, m_t, z_t, a_t = state
    lse_s, lse_t = m_s + jnp.log(z_s), m_t + jnp.log(z_t)
    fkl = a_t / z_t + (lse_s - lse_t)
    rkl = a_s / z_s + (lse_t - lse_s)
    kl = jnp.where(route_Tx1 == ROUTE_FKL, fkl, jnp.where(route_Tx1 == ROUTE_RKL, rkl, 0.0))
    return kl, lse_s, lse_t


def kl_dlogits(s_TxV, t_TxV, route_Tx1, lse_s, lse_t, kl, g_Tx1, valid_1xV=None):
    """d(sum_t g_t kl_t) / d s for one tile, float32 [bt, bv].

    FKL: p - q.  RKL: p * (log p - log q - KL).  Route 0 (and masked columns): 0.
    """
    logp_TxV = s_TxV - lse_s
    logq_TxV = t_TxV - lse_t
    p_TxV = jnp.exp(logp_TxV)
    fkl_grad = p_TxV - jnp.exp(logq_TxV)
    rkl_grad = p_TxV * (logp_TxV - logq_TxV - kl)
    ds = jnp.where(route_Tx1 == ROUTE_FKL, fkl_grad, jnp.where(route_Tx1 == ROUTE_RKL, rkl_grad, 0))
    ds = g_Tx1 * ds
    return ds if valid_1xV is None else jnp.where(valid_1xV, ds, 0.0)


def logp_init(shape):
    """Initial running state for `logp_update`."""
    neg, zero = jnp.full(shape, NEG, jnp.float32), jnp.zeros(shape, jnp.float32)
    return (neg, zero, zero, zero)


def logp_update(state, s_TxV, cols_1xV, target_Tx1, valid_1xV=None):
    """Fold one tile into (max, sum-exp, centred first moment, target logit).

    a = sum exp(s - m) * (s - m) is kept centred on the running max, so the entropy
    log z - a / z does not cancel two numbers of the size of the logits.
    """
    m, z, a, tgt = state
    s_TxV = _mask(s_TxV, valid_1xV)
    m_new = jnp.maximum(m, jnp.max(s_TxV, axis=-1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    centred_TxV = s_TxV - m_new
    e_TxV = jnp.exp(centred_TxV)
    a = alpha * (a + z * (m - m_new)) + jnp.sum(e_TxV * centred_TxV, axis=-1, keepdims=True)
    z = z * alpha + jnp.sum(e_TxV, axis=-1, keepdims=True)
    tgt = tgt + jnp.sum(jnp.where(cols_1xV == target_Tx1, s_TxV, 0.0), axis=-1, keepdims=True)
    return (m_new, z, a, tgt)


def logp_finalize(state):
    """Running state -> (logp_target, entropy, lse), each [bt, 1] float32."""
    m, z, a, tgt = state
    lse = m + jnp.log(z)
    return tgt - lse, jnp.log(z) - a / z, lse


def logp_dlogits(s_TxV, cols_1xV, target_Tx1, lse, entropy, g_logp, g_ent, valid_1xV=None):
    """d(sum g_logp logp + g_ent H) / d s for one tile.

    = g_logp (1[v == target] - p) - g_ent p (log p + H).
    """
    logp_TxV = s_TxV - lse
    p_TxV = jnp.exp(logp_TxV)
    onehot = (cols_1xV == target_Tx1).astype(jnp.float32)
    ds = g_logp * (onehot - p_TxV) - g_ent * p_TxV * (logp_TxV + entropy)
    return ds if valid_1xV is None else jnp.where(valid_1xV, ds, 0.0)
