"""Feature maps phi for linear attention (apply to q and k before the op; all shape-preserving
on the last axis unless stated). They keep phi(q) . phi(k) >= 0, like the softmax kernel."""

import jax
import jax.numpy as jnp


def elu_plus_one(x_BxTxHxD):
    """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al., 2020)."""
    return jax.nn.elu(x_BxTxHxD) + 1.0


def relu(x_BxTxHxD):
    """phi(x) = max(x, 0)."""
    return jax.nn.relu(x_BxTxHxD)


def softmax_dim(x_BxTxHxD):
    """phi(x) = softmax over the feature axis (Liger / Hedgehog without learned maps): each
    token becomes a distribution over features, so phi(q) . phi(k) lies in (0, 1]."""
    return jax.nn.softmax(x_BxTxHxD.astype(jnp.float32), axis=-1).astype(x_BxTxHxD.dtype)


def softmax_dim_signed(x_BxTxHxD):
    """phi(x) = softmax([x, -x]) over the feature axis: [..., D] -> [..., 2D]; keeps the
    sign information a plain softmax over x throws away."""
    both = jnp.concatenate([x_BxTxHxD, -x_BxTxHxD], axis=-1).astype(jnp.float32)
    return jax.nn.softmax(both, axis=-1).astype(x_BxTxHxD.dtype)


FEATURE_MAPS = {
    "elu_plus_one": elu_plus_one,
    "relu": relu,
    "softmax_dim": softmax_dim,
    "softmax_dim_signed": softmax_dim_signed,
}


def get(name):
    """Feature map by name; ValueError lists the known names."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature map must be one of {sorted(FEATURE_MAPS)}, got {name!r}")
    return FEATURE_MAPS[name]
