"""Linearised Qwen3 attention: sliding-window softmax + gated linear attention beyond the window
(Liger Attention style), built from a dense checkpoint's own weights.

    o_i = alpha * softmax-attention(q_i; the last w real tokens, i included)
        + beta  * sum_{j: i - j >= w} exp(B_i - B_j) phi(q_i) . phi(k_j) v_j,   B_i = sum_t<=i g_t

Choices (no new parameters, so a Qwen3 checkpoint loads unchanged; all in `ModelConfig.hybrid_*`):
- phi (`hybrid_feature_map`, default "softmax_dim"): applied to the same RMS-normed, roped q and
  k that the softmax branch uses.
- decay (`hybrid_gate`): "key" gives log g_{t,h} = logsigmoid(mean_d k^_{t,kv(h),d}) / normalizer
  with k^ the k_norm'ed key before RoPE: a position-free function of the key weights, like
  Liger's gate pooled from the key projection, but one scalar per head because the op takes
  [B, T, H] decays. It keeps the unnormalised linear branch bounded (an effective memory of
  ~normalizer / log 2 tokens at g = 1/2). "none": no decay (the linear state only grows).
- alpha = 1 by default, so for sequences no longer than the window the layer equals the dense
  one exactly and a linearised checkpoint starts where the dense one was; beta = 0.5 adds the
  far context. (Liger fine-tunes with alpha = beta = 0.5.)

Padding: key j < T of row b is a real token iff some query of the call sees it
(`AttentionMask.keys_seen_before`: kv_valid[b, j] and j <= the row's last query slot). The hybrid
layer assumes the mask is causal over valid keys (what `causal_mask` and the samplers build) and
is causal by construction. Valid tokens are moved to the front of each row by a stable per-row
permutation, the op runs there, and outputs go back: pads never enter the window or the linear
state, the window counts real tokens, and pad rows output 0.

Caches: a hybrid layer's cache is a `HybridState` (window ring buffer of the last w tokens +
one [Dk, Dv] state per head + length), constant in the generation length. A call with a cache
and T > 1 is a prefill (cache_index must be 0) and returns that state; T == 1 is a decode step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtrace.models.attention import AttentionMask
from jaxtrace.models.config import ModelConfig
from jaxtrace.models.qwen3 import Attention, rope
from pallas_kernels.linear_attention import (
    IMPLEMENTATIONS,
    HybridState,
    feature_maps,
    hybrid_attention,
    hybrid_attention_step,
    init_hybrid_state,
)

f32 = jnp.float32
GATES = ("key", "none")

__all__ = [
    "HybridAttention",
    "HybridState",
    "attend",
    "init_hybrid_cache",
    "linearize",
    "prefill_state",
]


# ---------------------------------------------------------------------------- config
def check_config(cfg: ModelConfig) -> None:
    """ValueError naming the first bad `hybrid_*` field."""
    for name in ("hybrid_window", "hybrid_chunk"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    feature_maps.get(cfg.hybrid_feature_map)  # raises with the known names
    if cfg.hybrid_gate not in GATES:
        raise ValueError(f"ModelConfig.hybrid_gate={cfg.hybrid_gate!r}; use one of {GATES}")
    if not cfg.hybrid_gate_normalizer > 0:
        raise ValueError(
            f"ModelConfig.hybrid_gate_normalizer={cfg.hybrid_gate_normalizer} must be > 0"
        )
    if cfg.hybrid_implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"ModelConfig.hybrid_implementation={cfg.hybrid_implementation!r}; "
            f"use one of {IMPLEMENTATIONS}"
        )
    bad = [i for i in cfg.hybrid_layers if not 0 <= i < cfg.num_layers]
    if bad:
        raise ValueError(
            f"ModelConfig.hybrid_layers={cfg.hybrid_layers}: layers {bad} are not "
            f"in [0, num_layers={cfg.num_layers})"
        )


def linearize(cfg: ModelConfig, layers=None, **hybrid_overrides) -> ModelConfig:
    """A dense Qwen3 config turned hybrid in `layers` (default: all), with the same parameters.

    `hybrid_overrides` set `hybrid_*` fields, e.g. `linearize(cfg, range(0, 28, 2),
    hybrid_window=512)`. The params of `cfg` load into the result unchanged.
    """
    if cfg.family == "qwen3_moe":
        raise ValueError(
            "linearize: family='qwen3_moe' is not supported (the hybrid family uses dense MLPs)"
        )
    unknown = [
        k
        for k in hybrid_overrides
        if not k.startswith("hybrid_") or k == "hybrid_layers" or not hasattr(cfg, k)
    ]
    if unknown:
        raise ValueError(
            f"linearize: unknown hybrid fields {unknown} (pass layers= for the layer list)"
        )
    layers = range(cfg.num_layers) if layers is None else layers
    layers = tuple(sorted({int(i) for i in layers}))
    out = cfg.replace(family="qwen3_hybrid", hybrid_layers=layers, **hybrid_overrides)
    check_config(out)
    return out


def _lin_dim(cfg: ModelConfig) -> int:
    phi = feature_maps.get(cfg.hybrid_feature_map)
    return jax.eval_shape(phi, jax.ShapeDtypeStruct((1, 1, 1, cfg.head_dim), f32)).shape[-1]


def init_hybrid_cache(cfg: ModelConfig, batch: int, dtype=None) -> HybridState:
    """The empty constant-size decode state of one hybrid layer (independent of max length):
    k_win / v_win [B, w, K, Dh], k_lin_win [B, w, K, Dk], age_win [B, w, H] f32,
    linear_state [B, H, Dk, Dh] f32, length [B] int32."""
    dtype = dtype or cfg.compute_dtype
    return init_hybrid_state(
        batch,
        cfg.hybrid_window,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        _lin_dim(cfg),
        cfg.head_dim,
        dtype,
    )


# ---------------------------------------------------------------------------- pure functions
def _time_gather(x, idx_BxT):
    """x [B, T, ...] gathered along time per row."""
    idx = idx_BxT.reshape(idx_BxT.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _zero_pads(x, valid_BxT):
    if x is None:
        return None
    return jnp.where(valid_BxT.reshape(valid_BxT.shape + (1,) * (x.ndim - 2)), x, 0).astype(x.dtype)


def _compact(valid_BxT, *xs):
    """Moves each row's valid tokens to the front (order kept) and zeroes the pads.
    Returns (inverse permutation [B, T], the compacted xs)."""
    perm = jnp.argsort(~valid_BxT, axis=1, stable=True)
    inv = jnp.argsort(perm, axis=1)
    return inv, [None if x is None else _time_gather(_zero_pads(x, valid_BxT), perm) for x in xs]


def attend(
    q,
    k,
    v,
    q_lin,
    k_lin,
    log_g,
    valid_BxT,
    *,
    window,
    alpha,
    beta,
    chunk_size=64,
    implementation="xla",
    return_compacted=False,
):
    """Hybrid attention of a (possibly padded) sequence.

    q [B, T, H, D], k / v [B, T, K, D], q_lin [B, T, H, Dk], k_lin [B, T, K, Dk] (feature-mapped),
    log_g [B, T, H] or None, valid_BxT bool. Returns o [B, T, H, D] (0 at pads); with
    `return_compacted` also the compacted (k, v, k_lin, log_g) that `prefill_state` takes.
    """
    inv, (qc, kc, vc, qlc, klc, gc) = _compact(valid_BxT, q, k, v, q_lin, k_lin, log_g)
    o = hybrid_attention(
        qc,
        kc,
        vc,
        qlc,
        klc,
        gc,
        window=window,
        alpha=alpha,
        beta=beta,
        chunk_size=chunk_size,
        block_size=chunk_size,
        implementation=implementation,
    )
    o = _zero_pads(_time_gather(o, inv), valid_BxT)
    if return_compacted:
        return o, (kc, vc, klc, gc)
    return o


def prefill_state(k, v, k_lin, log_g, length_B, window, like: HybridState) -> HybridState:
    """The decode state after the first `length_B[b]` tokens of each row.

    k, v [B, T, K, D], k_lin [B, T, K, Dk], log_g [B, T, H] or None: compacted (valid tokens
    first, zeros after). `like` gives the dtypes (the layer's cache). Ring slot s holds the
    latest token r < length with r = s (mod w), as `hybrid_attention_step` expects.
    """
    b, t, kv = k.shape[:3]
    h = like.linear_state.shape[1]
    length = length_B.astype(jnp.int32)
    if log_g is None:
        cum = jnp.zeros((b, t, h), f32)
    else:
        cum = jnp.cumsum(log_g.astype(f32), axis=1)
    last = jnp.take_along_axis(cum, jnp.maximum(length - 1, 0)[:, None, None], axis=1)
    # Tokens at real index r <= length - 1 - w have left the window: into the linear state,
    # decayed to the last token (log_g <= 0, so the exponent is <= 0 and nothing overflows).
    far_BxT = jnp.arange(t)[None] <= (length - 1 - window)[:, None]
    w_BxTxH = jnp.where(far_BxT[..., None], jnp.exp(jnp.minimum(last - cum, 0.0)), 0.0)
    lin = jnp.einsum(
        "btkg,btkd,btkv->bkgdv",
        w_BxTxH.reshape(b, t, kv, h // kv),
        k_lin.astype(f32),
        v.astype(f32),
    )
    lin = lin.reshape(b, h, *lin.shape[-2:])
    last_B1 = (length - 1)[:, None]
    pos_BxW = last_B1 - jnp.mod(last_B1 - jnp.arange(window)[None], window)
    filled = pos_BxW >= 0
    idx = jnp.maximum(pos_BxW, 0)
    take = lambda x, dt: _zero_pads(_time_gather(x, idx), filled).astype(dt)
    age = _zero_pads(last - _time_gather(cum, idx), filled)
    return HybridState(
        take(k, like.k_win.dtype),
        take(v, like.v_win.dtype),
        take(k_lin, like.k_lin_win.dtype),
        age,
        lin,
        length,
    )


# ---------------------------------------------------------------------------- the layer
class HybridAttention(Attention):
    """Drop-in for `Attention` (same parameters and call) with hybrid attention; see the module
    docstring. `__call__(x [B, T, D], positions [B, T], mask (AttentionMask), cache, cache_index)
    -> (out [B, T, D], cache)`; cache is None (training) or a `HybridState`."""

    def __init__(self, cfg: ModelConfig, rngs):
        super().__init__(cfg, rngs)
        check_config(cfg)
        self.window, self.chunk = cfg.hybrid_window, cfg.hybrid_chunk
        self.feature_map = cfg.hybrid_feature_map
        self.gate, self.gate_normalizer = cfg.hybrid_gate, cfg.hybrid_gate_normalizer
        self.alpha, self.beta = cfg.hybrid_alpha, cfg.hybrid_beta
        self.implementation = cfg.hybrid_implementation

    def project(self, x_BxTxD, positions_BxT):
        """(q, k, v, phi(q), phi(k), log_g [B, T, H] or None)."""
        dt = self.dtype
        q = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.q_proj[...].astype(dt))
        k = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.k_proj[...].astype(dt))
        v = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.v_proj[...].astype(dt))
        q, k = self.q_norm(q), self.k_norm(k)
        log_g = None
        if self.gate == "key":
            g_BxTxK = jax.nn.log_sigmoid(jnp.mean(k.astype(f32), axis=-1)) / self.gate_normalizer
            log_g = jnp.repeat(g_BxTxK, q.shape[2] // k.shape[2], axis=2)
        q = rope(q, positions_BxT, self.rope_theta)
        k = rope(k, positions_BxT, self.rope_theta)
        phi = feature_maps.get(self.feature_map)
        return q, k, v, phi(q), phi(k), log_g

    def __call__(
        self,
        x_BxTxD,
        positions_BxT,
        mask: AttentionMask,
        cache: HybridState | None = None,
        cache_index=None,
    ):
        b, t = x_BxTxD.shape[:2]
        if not isinstance(mask, AttentionMask) or mask.shape[:2] != (b, t):
            got = mask.shape if isinstance(mask, AttentionMask) else type(mask).__name__
            raise ValueError(
                f"HybridAttention: mask must be an AttentionMask [B={b}, T={t}, S], got {got}"
            )
        q, k, v, q_lin, k_lin, log_g = self.project(x_BxTxD, positions_BxT)
        if cache is not None and t == 1:
            return self._decode(q, k, v, q_lin, k_lin, log_g, mask, cache, cache_index)
        if cache is not None and isinstance(cache_index, int) and cache_index != 0:
            raise ValueError(
                f"HybridAttention: a cached call with T={t} > 1 is a prefill and "
                f"needs cache_index=0, got {cache_index}"
            )
        if mask.shape[2] < t:
            raise ValueError(f"HybridAttention: mask {mask.shape} has fewer than T={t} key columns")
        valid_BxT = mask.keys_seen_before(t)
        o, compacted = attend(
            q,
            k,
            v,
            q_lin,
            k_lin,
            log_g,
            valid_BxT,
            window=self.window,
            alpha=self.alpha,
            beta=self.beta,
            chunk_size=self.chunk,
            implementation=self.implementation,
            return_compacted=True,
        )
        if cache is not None:
            cache = prefill_state(*compacted, valid_BxT.sum(axis=1), self.window, cache)
        return self.output(o), cache

    def _decode(self, q, k, v, q_lin, k_lin, log_g, mask: AttentionMask, state, cache_index):
        o, new = hybrid_attention_step(
            q[:, 0],
            k[:, 0],
            v[:, 0],
            q_lin[:, 0],
            k_lin[:, 0],
            None if log_g is None else log_g[:, 0],
            state,
            alpha=self.alpha,
            beta=self.beta,
        )
        # A pad fed at decode time (its own slot masked out) leaves the state untouched.
        if cache_index is None:
            ok_B = jnp.ones(q.shape[:1], bool)
        else:  # the rollout engine: a slot per row ([B]), >= S for idle rows
            ok_B = mask.sees_slot(cache_index)
        keep = lambda n, s: jnp.where(ok_B.reshape((-1,) + (1,) * (n.ndim - 1)), n, s)
        new = jax.tree.map(keep, new, state)
        o = jnp.where(ok_B[:, None, None], o, 0).astype(o.dtype)
        return self.output(o[:, None]), new
