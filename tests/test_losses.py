"""Tests for jaxtrace.losses: hand-computed values, gradients vs naive per-token formulas, edges."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrace import losses as L

ATOL = 1e-5


def close(a, b, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol)


# ----------------------------------------------------------------------------- group advantages


def test_group_advantages_hand_values():
    # groups of 4: mixed, all correct, all wrong, half/half
    rewards = jnp.array([1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0], jnp.float32)
    adv, zero = L.group_advantages(rewards, 4, eps=0.0, ddof=0)
    # group 1: mean .25, std sqrt(.25 * .75) = .4330127 -> .75/.433 = 1.7320508, -.25/.433
    # group 4: mean .5, std .5 -> +-1
    want = [1.7320508, -0.5773503, -0.5773503, -0.5773503] + [0.0] * 8 + [1, 1, -1, -1]
    close(adv, want)
    assert zero.dtype == jnp.bool_
    assert zero.tolist() == [False] * 4 + [True] * 8 + [False] * 4
    assert float(jnp.mean(zero)) == 0.5  # fraction of zero-variance groups


def test_group_advantages_scale_none_and_ddof():
    rewards = jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    adv, _ = L.group_advantages(rewards, 4, scale="none")
    close(adv, [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    adv1, _ = L.group_advantages(rewards[4:], 4, eps=0.0, ddof=1)
    close(adv1, [0.8660254, 0.8660254, -0.8660254, -0.8660254])  # std sqrt(1/3)


def test_group_advantages_zero_variance_exact():
    # 0.1 is not exact in float32; the mean of eight copies can differ from 0.1 by rounding,
    # which with eps would still give a tiny nonzero advantage unless the group is zeroed.
    rewards = jnp.full((8,), 0.1, jnp.float32)
    adv, zero = L.group_advantages(rewards, 8)
    assert bool(jnp.all(adv == 0.0)) and bool(jnp.all(zero))
    adv, zero = jax.jit(L.group_advantages, static_argnums=1)(jnp.array([2.0, 2.0, 0.0, 1.0]), 2)
    close(adv, [0, 0, -(0.5**0.5), 0.5**0.5], atol=1e-5)  # std of (0, 1) with ddof 1
    assert zero.tolist() == [True, True, False, False]


@pytest.mark.parametrize(
    "rewards, g",
    [
        (jnp.zeros(4), 1),  # group size 1: the advantage is undefined
        (jnp.zeros(4), 0),
        (jnp.zeros(5), 2),  # not a multiple
        (jnp.zeros((2, 2)), 2),  # not 1-D
        (jnp.zeros(4), 2.0),  # not an int
    ],
)
def test_group_advantages_bad_inputs(rewards, g):
    with pytest.raises(ValueError, match="group_size|rewards_N"):
        L.group_advantages(rewards, g)


def test_group_advantages_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        L.group_advantages(jnp.zeros(4), 2, scale="mean")


# ----------------------------------------------------------------------------- policy gradient

# seq 0: ratios 1, 1.5, 0.5 with A = +1; seq 1: ratios 0.7, 1.1, (2.0 masked) with A = -2
RATIOS = np.array([[1.0, 1.5, 0.5], [0.7, 1.1, 2.0]], np.float32)
LOGP = np.array([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.2]], np.float32)
OLD_LOGP = LOGP - np.log(RATIOS)
ADV = np.array([1.0, -2.0], np.float32)
MASK = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
# per token -min(rA, clip(r, .8, 1.2) A): [-1, -1.2 (clipped high), -0.5], [1.6 (clipped low), 2.2]
# sum = 1.1 over 5 tokens; per-sequence means -0.9 and 1.9


@pytest.mark.parametrize(
    "norm, max_len, want",
    [
        ("token", None, 1.1 / 5),
        ("sequence", None, (-0.9 + 1.9) / 2),
        ("constant", 4, 1.1 / 8),
        ("constant", None, 1.1 / 6),  # max_len defaults to T = 3
    ],
)
def test_pg_loss_hand_values(norm, max_len, want):
    loss, m = L.policy_gradient_loss(LOGP, OLD_LOGP, ADV, MASK, norm=norm, max_len=max_len)
    close(loss, want)
    close(m["clip_frac_high"], 0.2)
    close(m["clip_frac_low"], 0.2)
    close(m["clip_frac"], 0.4)
    close(m["ratio_mean"], 0.96)
    close(m["approx_kl"], 0.3490468 / 5)  # mean of r - 1 - log r
    close(m["n_tokens"], 5)
    close(m["ref_kl"], 0.0)


def test_pg_loss_clip_higher():
    # DAPO eps_high .28: token (0, 1) gives -1.28 instead of -1.2
    loss, _ = L.policy_gradient_loss(LOGP, OLD_LOGP, ADV, MASK, eps_high=0.28)
    close(loss, 1.02 / 5)


def test_pg_loss_ref_kl_hand_value():
    logp = jnp.array([[-1.0, -2.0]])
    ref = logp + jnp.log(2.0)  # ref - logp = log 2: k3 = 2 - log 2 - 1 = 0.3068528
    mask = jnp.array([[1.0, 0.0]])
    loss, m = L.policy_gradient_loss(
        logp, logp, jnp.zeros(1), mask, ref_logp_BxT=ref, ref_kl_coef=0.1
    )
    close(m["ref_kl"], 0.3068528)
    close(loss, 0.1 * 0.3068528)


def test_pg_loss_on_policy_gradient_is_minus_adv():
    logp = jnp.array(LOGP)
    mask = jnp.array(MASK)

    def f(lp):
        return L.policy_gradient_loss(lp, jax.lax.stop_gradient(lp), ADV, mask)[0]

    # ratio 1, no clipping: d/dlogp = -A / N on every valid token
    close(jax.grad(f)(logp), [[-0.2, -0.2, -0.2], [0.4, 0.4, 0.0]])
    close(f(logp), (-3 + 4) / 5)


def naive_normalise(terms_BxT, mask, norm, max_len=None):
    """Normalisation written out with NumPy bookkeeping (mask is a concrete array)."""
    mask = np.asarray(mask, np.float32)
    rows = [b for b in range(mask.shape[0]) if mask[b].sum() > 0]
    if norm == "token":
        return jnp.sum(terms_BxT * mask) / max(mask.sum(), 1.0)
    if norm == "sequence":
        means = [jnp.sum(terms_BxT[b] * mask[b]) / mask[b].sum() for b in rows]
        return sum(means) / max(len(means), 1)
    return jnp.sum(terms_BxT * mask) / (mask.shape[0] * max_len)


def naive_pg_token(logp, old, adv, ref_p, beta, eps_low, eps_high):
    """One token of the clipped surrogate + k3 penalty; shares no code with the library."""
    r = jnp.exp(logp - old)
    term = -jnp.minimum(r * adv, jnp.clip(r, 1 - eps_low, 1 + eps_high) * adv)
    x = ref_p / jnp.exp(logp)  # pi_ref / pi_theta
    return term + beta * (x - jnp.log(x) - 1)


def naive_pg_loss(logp, old, adv, mask, eps_low, eps_high, norm, max_len, ref_p, beta):
    per_token = jax.vmap(
        jax.vmap(naive_pg_token, in_axes=(0, 0, None, 0, None, None, None)),
        in_axes=(0, 0, 0, 0, None, None, None),
    )
    terms = per_token(logp, old, adv, ref_p, beta, eps_low, eps_high)
    return naive_normalise(terms, mask, norm, max_len)


@pytest.mark.parametrize(
    "shape, norm",
    [
        ((1, 1), "token"),
        ((1, 1), "sequence"),
        ((2, 5), "token"),
        ((2, 5), "constant"),
        ((3, 4), "sequence"),  # row 2 has no valid token: left out of the sequence mean
    ],
)
def test_pg_loss_grad_vs_naive(shape, norm):
    B, T = shape
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(B * 10 + T), 5)
    logp = -jax.random.uniform(k1, shape, minval=0.1, maxval=3.0)
    old = logp + 0.4 * jax.random.normal(k2, shape)  # off-policy: some tokens clip
    adv = jax.random.normal(k3, (B,))
    mask = (jax.random.uniform(k4, shape) < 0.7).astype(jnp.float32).at[0, 0].set(1.0)
    if B == 3:
        mask = mask.at[2].set(0.0)
    ref_p = jnp.exp(-jax.random.uniform(k5, shape, minval=0.1, maxval=3.0))
    max_len = T + 2
    kw = dict(eps_low=0.2, eps_high=0.28, norm=norm, max_len=max_len)

    def lib(lp):
        return L.policy_gradient_loss(
            lp, old, adv, mask, ref_logp_BxT=jnp.log(ref_p), ref_kl_coef=0.05, **kw
        )[0]

    def ref(lp):
        return naive_pg_loss(lp, old, adv, mask, 0.2, 0.28, norm, max_len, ref_p, 0.05)

    (v_lib, g_lib), (v_ref, g_ref) = (jax.jit(jax.value_and_grad(f))(logp) for f in (lib, ref))
    close(v_lib, v_ref)
    close(g_lib, g_ref)


@pytest.mark.parametrize("norm", ["token", "sequence", "constant"])
def test_pg_loss_all_masked_is_zero_not_nan(norm):
    logp = jnp.array([[-1.0, -jnp.inf], [-2.0, -3.0]])
    old = jnp.array([[-jnp.inf, 0.0], [-2.0, -1.0]])  # junk in padding slots
    mask = jnp.zeros((2, 2))

    def f(lp):
        return L.policy_gradient_loss(lp, old, jnp.ones(2), mask, norm=norm)

    (loss, m), g = jax.value_and_grad(f, has_aux=True)(logp)
    assert float(loss) == 0.0
    assert bool(jnp.all(g == 0.0))
    assert all(bool(jnp.isfinite(v)) for v in m.values())


def test_pg_loss_padding_junk_does_not_leak():
    logp = jnp.array([[-1.0, -jnp.inf]])
    old = jnp.array([[-1.5, jnp.nan]])
    mask = jnp.array([[1.0, 0.0]])
    f = lambda lp: L.policy_gradient_loss(lp, old, jnp.array([1.0]), mask)[0]
    g = jax.grad(f)(logp)
    assert bool(jnp.all(jnp.isfinite(g))) and float(g[0, 1]) == 0.0
    close(f(logp), -1.2)  # ratio e^0.5 = 1.65 > 1.2 with A = 1: clipped


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mask_BxT=jnp.ones((2, 4))), "mask_BxT"),
        (dict(old_logp_BxT=jnp.ones((3,))), "old_logp_BxT"),
        (dict(adv_B=jnp.ones(3)), "adv"),
        (dict(norm="mean"), "norm"),
        (dict(eps_low=-0.1), "eps"),
        (dict(ref_kl_coef=0.1), "ref_logp_BxT"),
        (dict(norm="constant", max_len=0), "max_len"),
    ],
)
def test_pg_loss_bad_inputs(kwargs, match):
    args = dict(
        logp_BxT=jnp.zeros((2, 3)),
        old_logp_BxT=jnp.zeros((2, 3)),
        adv_B=jnp.ones(2),
        mask_BxT=jnp.ones((2, 3)),
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        L.policy_gradient_loss(**args)


def test_pg_loss_jits():
    f = jax.jit(lambda lp, old: L.policy_gradient_loss(lp, old, ADV, MASK, norm="sequence"))
    loss, m = f(jnp.array(LOGP), jnp.array(OLD_LOGP))
    close(loss, 0.5)
    close(m["clip_frac"], 0.4)


# ----------------------------------------------------------------------------- DAPO extras, presets


def test_overlong_penalty_values():
    lengths = jnp.array([0, 6, 7, 8, 10, 11])
    # L = 10, C = 4: soft zone (6, 10], linear from 0 at 6 to -1 at 10, -1 beyond
    close(L.overlong_penalty(lengths, 10, 4), [0, 0, -0.25, -0.5, -1, -1])
    close(L.overlong_penalty(lengths, 10, 0), [0, 0, 0, 0, 0, -1])
    with pytest.raises(ValueError, match="cache_len"):
        L.overlong_penalty(lengths, 10, 11)
    with pytest.raises(ValueError, match="max_len"):
        L.overlong_penalty(lengths, 0, 0)


def test_overlong_filter_mask():
    mask = jnp.array([[1, 1, 0], [1, 1, 1]], jnp.int32)
    out = L.overlong_filter_mask(mask, jnp.array([False, True]))
    assert out.tolist() == [[1, 1, 0], [0, 0, 0]] and out.dtype == mask.dtype
    with pytest.raises(ValueError, match="truncated_B"):
        L.overlong_filter_mask(mask, jnp.array([True]))


def test_dual_clip_hand_values():
    # A = -1: ratios 0.5 (clipped low: loss 0.8), 2 (unclipped: 2), 4 (dual-clipped at c = 3: 3)
    logp = jnp.log(jnp.array([[0.5, 2.0, 4.0]]))
    old = jnp.zeros((1, 3))
    mask = jnp.ones((1, 3))
    loss, m = L.policy_gradient_loss(logp, old, -jnp.ones(1), mask, clip_ratio_c=3.0)
    close(loss, (0.8 + 2.0 + 3.0) / 3)
    close(m["clip_frac_dual"], 1 / 3)
    close(m["clip_frac_low"], 1 / 3)
    grad = jax.grad(
        lambda lp: L.policy_gradient_loss(lp, old, -jnp.ones(1), mask, clip_ratio_c=3.0)[0]
    )(logp)
    close(grad, [[0.0, 2.0 / 3, 0.0]])  # d(-A r)/dlogp = r / 3 where unclipped; 0 where clipped
    off, m_off = L.policy_gradient_loss(logp, old, -jnp.ones(1), mask)
    close(off, (0.8 + 2.0 + 4.0) / 3)
    close(m_off["clip_frac_dual"], 0.0)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        L.policy_gradient_loss(logp, old, -jnp.ones(1), mask, clip_ratio_c=0.9)


def test_ref_kl_estimators():
    logp = jnp.array([[-1.0, -2.0]])
    ref = logp + jnp.array([[jnp.log(2.0), -0.5]])  # d = ref - logp
    k1 = L.ref_kl_estimate(logp, ref, "k1")
    k3 = L.ref_kl_estimate(logp, ref, "k3")
    close(k1, [[-math.log(2.0), 0.5]])
    close(k3, [[2 - math.log(2.0) - 1, math.exp(-0.5) + 0.5 - 1]])
    g1 = jax.grad(lambda lp: jnp.sum(L.ref_kl_estimate(lp, ref, "k1")))(logp)
    close(g1, [[1.0, 1.0]])  # plain estimator: the gradient of logp itself
    with pytest.raises(ValueError, match="estimator"):
        L.ref_kl_estimate(logp, ref, "k2")
    loss, m = L.policy_gradient_loss(
        logp,
        logp,
        jnp.zeros(1),
        jnp.ones((1, 2)),
        ref_logp_BxT=ref,
        ref_kl_coef=0.5,
        ref_kl_estimator="k1",
    )
    close(loss, 0.5 * float(jnp.mean(k1)))
    close(m["ref_kl"], float(jnp.mean(k1)))


def test_group_advantages_default_std_is_unbiased():
    rewards = jnp.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    adv, _ = L.group_advantages(rewards, 8, eps=0.0)
    want = (rewards - 0.125) / np.std(np.asarray(rewards), ddof=1)  # torch.std, verl / TRL
    close(adv, want)


# ----------------------------------------------------------------------------- distillation

S_LOGITS = jnp.array([0.0, 0.0])  # p_s = (.5, .5)
T_LOGITS = jnp.array([math.log(3.0), 0.0])  # p_t = (.75, .25)


def test_divergences_hand_values():
    # FKL = .75 ln 1.5 + .25 ln .5; RKL = .5 ln(2/3) + .5 ln 2; JSD with m = (.625, .375)
    close(L.forward_kl(S_LOGITS, T_LOGITS), 0.1308120)
    close(L.reverse_kl(S_LOGITS, T_LOGITS), 0.1438410)
    close(L.jsd(S_LOGITS, T_LOGITS, 0.5), 0.0338221)
    close(L.jsd(T_LOGITS, S_LOGITS, 0.5), 0.0338221)  # symmetric at beta = .5
    assert L.forward_kl(S_LOGITS.astype(jnp.bfloat16), T_LOGITS).dtype == jnp.float32


def naive_kl(logits_p, logits_q):
    p = jnp.exp(logits_p) / jnp.sum(jnp.exp(logits_p), -1, keepdims=True)
    q = jnp.exp(logits_q) / jnp.sum(jnp.exp(logits_q), -1, keepdims=True)
    return jnp.sum(p * jnp.log(p / q), -1)


def naive_jsd(s, t, beta):
    p = jax.nn.softmax(t, -1)
    q = jax.nn.softmax(s, -1)
    m = beta * p + (1 - beta) * q
    return beta * jnp.sum(p * jnp.log(p / m), -1) + (1 - beta) * jnp.sum(q * jnp.log(q / m), -1)


def _divergences_and_grads(divs):
    """One jitted function: values and (student, teacher) gradients of several divergences."""

    def f(s, t):
        return [jax.value_and_grad(lambda s, t, d=d: jnp.sum(d(s, t)), (0, 1))(s, t) for d in divs]

    return jax.jit(f)


LIB_DIVS = _divergences_and_grads([L.forward_kl, L.reverse_kl, lambda s, t: L.jsd(s, t, 0.3)])
_sg = jax.lax.stop_gradient
NAIVE_DIVS = _divergences_and_grads(
    [
        lambda s, t: naive_kl(_sg(t), s),
        lambda s, t: naive_kl(s, _sg(t)),
        lambda s, t: naive_jsd(s, _sg(t), 0.3),
    ]
)


@pytest.mark.parametrize("shape", [(1, 1), (2, 3, 11)])
def test_divergences_vs_naive_and_reference(shape):
    from pallas_kernels.span_kl.reference import span_kl_from_logits

    ks, kt = jax.random.split(jax.random.key(sum(shape)))
    s = 2.0 * jax.random.normal(ks, shape)
    t = 2.0 * jax.random.normal(kt, shape)
    for (v_lib, g_lib), (v_ref, g_ref) in zip(LIB_DIVS(s, t), NAIVE_DIVS(s, t), strict=True):
        close(v_lib, v_ref)
        close(g_lib[0], g_ref[0])
        assert bool(jnp.all(g_lib[1] == 0.0))  # teacher is stop-gradient
    assert L.forward_kl(s, t).shape == shape[:-1]
    s2, t2 = s.reshape(-1, shape[-1]), t.reshape(-1, shape[-1])
    n = s2.shape[0]
    close(L.forward_kl(s2, t2), span_kl_from_logits(s2, t2, jnp.full((n,), 1)))
    close(L.reverse_kl(s2, t2), span_kl_from_logits(s2, t2, jnp.full((n,), 2)))


def test_forward_kl_masked_teacher_vocab_is_finite():
    s = jnp.array([[0.5, -1.0, 2.0]])
    t = jnp.array([[1.0, -jnp.inf, 0.0]])  # a vocab entry the teacher forbids
    val, g = jax.value_and_grad(lambda s: jnp.sum(L.forward_kl(s, t)))(s)
    p_t = jax.nn.softmax(t[0, jnp.array([0, 2])])
    logp_s = jax.nn.log_softmax(s[0])[jnp.array([0, 2])]
    close(val, jnp.sum(p_t * (jnp.log(p_t) - logp_s)))  # the forbidden entry adds 0 log 0 = 0
    assert bool(jnp.isfinite(val)) and bool(jnp.all(jnp.isfinite(g)))


def test_divergence_bad_inputs():
    with pytest.raises(ValueError, match="teacher_logits"):
        L.forward_kl(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="beta"):
        L.jsd(S_LOGITS, T_LOGITS, 0.0)
    with pytest.raises(ValueError, match="beta"):
        L.jsd(S_LOGITS, T_LOGITS, 1.0)


@pytest.mark.parametrize(
    "norm, max_len, want",
    [("token", None, 7 / 3), ("sequence", None, (1.5 + 4) / 2), ("constant", 3, 7 / 6)],
)
def test_all_token_distill_loss(norm, max_len, want):
    kl = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    close(L.all_token_distill_loss(kl, mask, norm, max_len=max_len), want)
    assert float(L.all_token_distill_loss(kl, jnp.zeros((2, 3)), norm)) == 0.0
    with pytest.raises(ValueError, match="mask_BxT"):
        L.all_token_distill_loss(kl, mask[:1], norm)


# ----------------------------------------------------------------------------- TRACE routing

I, G, F, R = L.ROUTE_IGNORE, L.ROUTE_GRPO, L.ROUTE_FKL, L.ROUTE_RKL


def test_route_constants_match_kl_op():
    from pallas_kernels.span_kl import reference

    assert (I, G, F, R) == (-1, 0, 1, 2)
    assert (G, F, R) == (reference.ROUTE_NONE, reference.ROUTE_FKL, reference.ROUTE_RKL)


# (response, key, error, correct, fkl_on_key_spans, rkl_on_error_spans) -> route
ROUTE_TABLE = [
    ((0, 1, 0, 1, True, True), I),  # prompt / padding, whatever the spans say
    ((0, 0, 1, 0, True, True), I),
    ((1, 0, 0, 1, True, True), G),  # plain token of a correct rollout
    ((1, 0, 0, 0, True, True), G),  # plain token of a wrong rollout
    ((1, 1, 0, 1, True, False), F),  # key span, correct
    ((1, 1, 0, 1, False, True), G),  # key span, correct, FKL switched off
    ((1, 1, 0, 0, True, True), G),  # key span on a wrong rollout: not distilled
    ((1, 0, 1, 0, True, False), G),  # error span, wrong, RKL off (the default)
    ((1, 0, 1, 0, True, True), R),  # error span, wrong, RKL on
    ((1, 0, 1, 0, False, True), R),
    ((1, 0, 1, 1, True, True), G),  # error span on a correct rollout
    ((1, 1, 1, 1, True, True), F),  # both spans: the verdict picks
    ((1, 1, 1, 0, True, True), R),
    ((1, 1, 1, 0, True, False), G),
]


@pytest.mark.parametrize("case, want", ROUTE_TABLE)
def test_token_routes_truth_table(case, want):
    resp, key, err, correct, fkl_on, rkl_on = case
    route = L.token_routes(
        jnp.array([[resp]]),
        jnp.array([[key]]),
        jnp.array([[err]]),
        jnp.array([correct]),
        fkl_on_key_spans=fkl_on,
        rkl_on_error_spans=rkl_on,
    )
    assert route.dtype == jnp.int32 and route.tolist() == [[want]]


def test_token_routes_exhaustive_batch():
    # every combination at once, as one [B, T] batch (one row per rollout verdict)
    combos = list(itertools.product([0, 1], repeat=3))  # (resp, key, err) per token
    resp = jnp.array([[c[0] for c in combos]] * 2)
    key = jnp.array([[c[1] for c in combos]] * 2)
    err = jnp.array([[c[2] for c in combos]] * 2)
    correct = jnp.array([True, False])
    for fkl_on, rkl_on in itertools.product([False, True], repeat=2):
        route = L.token_routes(
            resp, key, err, correct, fkl_on_key_spans=fkl_on, rkl_on_error_spans=rkl_on
        ).tolist()
        for b, ok in enumerate([True, False]):
            for t, (r, k, e) in enumerate(combos):
                if not r:
                    want = I
                elif ok and k and fkl_on:
                    want = F
                elif not ok and e and rkl_on:
                    want = R
                else:
                    want = G
                assert route[b][t] == want, (fkl_on, rkl_on, ok, r, k, e)


def test_token_routes_defaults_and_bad_inputs():
    resp = jnp.array([[0, 1, 1]])
    assert L.token_routes(resp).tolist() == [[I, G, G]]
    key = jnp.array([[1, 1, 0]])
    assert L.token_routes(resp, key, None, jnp.array([1.0])).tolist() == [[I, F, G]]
    with pytest.raises(ValueError, match="correct_B"):
        L.token_routes(resp, key)
    with pytest.raises(ValueError, match="key_mask_BxT"):
        L.token_routes(resp, key[:, :2], None, jnp.array([True]))
    with pytest.raises(ValueError, match="correct_B"):
        L.token_routes(resp, key, None, jnp.array([True, False]))
    with pytest.raises(ValueError, match="response_mask_BxT"):
        L.token_routes(jnp.array([1, 1]))


def test_routes_for_mode():
    route = jnp.array([[I, G, F, R]])
    assert L.routes_for_mode(route, "trace").tolist() == [[I, G, F, R]]
    assert L.routes_for_mode(route, "grpo").tolist() == [[I, G, G, G]]
    assert L.routes_for_mode(route, "opsd").tolist() == [[I, F, F, F]]
    assert L.routes_for_mode(route, "opsd+grpo", opsd_route=R).tolist() == [[I, R, R, R]]
    with pytest.raises(ValueError, match="mode"):
        L.routes_for_mode(route, "sft")
    with pytest.raises(ValueError, match="opsd_route"):
        L.routes_for_mode(route, "opsd", opsd_route=G)


# ----------------------------------------------------------------------------- KL schedule


@pytest.mark.parametrize(
    "decay, step, want",
    [
        ("linear", 0, 0.5),
        ("linear", 10, 0.5),  # end of warm-up: still lambda0
        ("linear", 15, 0.375),
        ("linear", 20, 0.25),  # mid decay
        ("linear", 30, 0.0),  # end of decay
        ("linear", 10_000, 0.0),
        ("cosine", 0, 0.5),
        ("cosine", 10, 0.5),
        ("cosine", 15, 0.4267767),  # .5 (1 + cos(pi / 4)) / 2
        ("cosine", 20, 0.25),
        ("cosine", 30, 0.0),
        ("cosine", 31, 0.0),
        ("constant", 0, 0.5),
        ("constant", 10_000, 0.5),
        ("linear", -3, 0.5),
    ],
)
def test_kl_coef_values(decay, step, want):
    lam = L.kl_coef(step, lambda0=0.5, warmup_steps=10, decay_steps=20, decay=decay)
    assert lam.dtype == jnp.float32
    close(lam, want, atol=1e-6)


def test_kl_coef_never_negative_monotone_and_traceable():
    steps = jnp.arange(0, 60)
    for decay in ("linear", "cosine"):
        f = jax.jit(
            jax.vmap(
                lambda s, d=decay: L.kl_coef(
                    s, lambda0=0.3, warmup_steps=5, decay_steps=37, decay=d
                )
            )
        )
        lam = np.asarray(f(steps))
        assert (lam >= 0).all() and (np.diff(lam) <= 1e-7).all()
        assert lam[:6].tolist() == [np.float32(0.3)] * 6 and (lam[42:] == 0).all()


def test_kl_coef_zero_decay_is_step_function():
    lam = [float(L.kl_coef(s, lambda0=1.0, warmup_steps=3, decay_steps=0)) for s in range(5)]
    assert lam == [1.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lambda0=-1.0), "lambda0"),
        (dict(lambda0=float("nan")), "lambda0"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(decay_steps=-1), "decay_steps"),
        (dict(decay="exp"), "decay"),
    ],
)
def test_kl_coef_bad_inputs(kwargs, match):
    args = dict(lambda0=1.0, warmup_steps=1, decay_steps=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        L.kl_coef(0, **args)


# ----------------------------------------------------------------------------- TRACE loss

TR_ROUTE = jnp.array([[G, F, F, I], [G, R, G, G]])
TR_KL = jnp.array([[9.0, 0.2, 0.4, 99.0], [0.0, 0.6, 7.0, 0.0]])  # 9 / 99 / 7 must be ignored
TR_ADV = jnp.array([1.0, -0.5])
TR_LOGP = jnp.array([[-1.0, -2.0, -0.5, -3.0], [-0.2, -1.0, -1.5, -2.5]])


def tr_loss(lam, route=TR_ROUTE, kl=TR_KL, **kw):
    # on-policy: ratio 1, so each GRPO token contributes -A
    return L.trace_loss(TR_LOGP, TR_LOGP, TR_ADV, route, kl, lam, **kw)


def test_trace_loss_hand_values_token_norm():
    loss, m = tr_loss(0.5)
    # 7 response tokens; GRPO: -1 (row 0) + 3 * 0.5 (row 1) = 0.5; KL: .2 + .4 + .6 = 1.2
    close(loss, (0.5 + 0.5 * 1.2) / 7)
    close(m["loss"], (0.5 + 0.5 * 1.2) / 7)
    close(m["pg_loss"], 0.5 / 7)
    close(m["kl_loss"], 1.2 / 7)
    close(m["n_response_tokens"], 7)
    close(m["frac_grpo"], 4 / 7)
    close(m["frac_fkl"], 2 / 7)
    close(m["frac_rkl"], 1 / 7)
    close(m["n_fkl_tokens"], 2)
    close(m["n_rkl_tokens"], 1)
    close(m["n_kl_tokens"], 3)
    close(m["kl_fkl_mean"], 0.3)
    close(m["kl_rkl_mean"], 0.6)
    close(m["lambda"], 0.5)
    close(m["exposure"], 1.5)
    close(m["clip_frac"], 0.0)
    close(m["ratio_mean"], 1.0)


def test_trace_loss_hand_values_sequence_norm():
    loss, _ = tr_loss(0.5, norm="sequence")
    # row 0: (-1 + .5 * .6) / 3; row 1: (1.5 + .5 * .6) / 4
    close(loss, (-0.7 / 3 + 1.8 / 4) / 2)


def test_trace_loss_lam_zero_falls_back_to_grpo():
    loss, m = tr_loss(0.0)
    close(loss, (-3 + 2) / 7)  # every response token GRPO: 3 * -1 + 4 * 0.5
    close(m["frac_grpo"], 1.0)
    close(m["exposure"], 0.0)
    loss, _ = tr_loss(0.0, grpo_when_lam_zero=False)
    close(loss, 0.5 / 7)  # KL tokens get nothing


def test_trace_loss_modes():
    loss, m = tr_loss(0.5, mode="grpo")
    close(loss, -1 / 7)
    close(m["n_kl_tokens"], 0.0)
    close(m["exposure"], 0.0)
    loss, _ = tr_loss(0.5, kl=None, mode="grpo")
    close(loss, -1 / 7)
    # opsd: KL on every response token, taken as given (the op was run with opsd routes):
    # 9 + .2 + .4 + 0 + .6 + 7 + 0 = 17.2
    loss, m = tr_loss(0.5, mode="opsd")
    close(loss, 0.5 * 17.2 / 7)
    close(m["pg_loss"], 0.0)
    close(m["frac_fkl"], 1.0)
    close(m["frac_grpo"], 0.0)
    close(m["n_kl_tokens"], 7)
    close(m["kl_fkl_mean"], 17.2 / 7)
    loss, m = tr_loss(0.5, mode="opsd+grpo", opsd_route=R)
    close(loss, (-1 + 0.5 * 17.2) / 7)
    close(m["frac_rkl"], 1.0)
    close(m["frac_grpo"], 1.0)
    close(m["kl_rkl_mean"], 17.2 / 7)


@pytest.mark.parametrize("norm", ["token", "sequence", "constant"])
def test_trace_loss_without_kl_tokens_equals_pg_loss(norm):
    mask = jnp.array(MASK)
    route = jnp.where(mask > 0, G, I)
    for eps_high in (0.2, 0.28):
        want, m_pg = L.policy_gradient_loss(
            LOGP, OLD_LOGP, ADV, mask, eps_high=eps_high, norm=norm, max_len=5
        )
        got, m = L.trace_loss(
            LOGP,
            OLD_LOGP,
            ADV,
            route,
            jnp.zeros_like(mask),
            0.7,
            eps_high=eps_high,
            norm=norm,
            max_len=5,
        )
        close(got, want)
        for k in ("clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean"):
            close(m[k], m_pg[k])


def naive_trace_token(s_logits, t_logits, token, old_logp, adv, route, lam):
    """One token of the TRACE loss by its definition; shares no code with the library."""
    p_s = jnp.exp(s_logits) / jnp.sum(jnp.exp(s_logits))
    p_t = jnp.exp(t_logits) / jnp.sum(jnp.exp(t_logits))
    p_t = jax.lax.stop_gradient(p_t)
    ratio = p_s[token] / jnp.exp(old_logp)
    pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.28) * adv)
    fkl = jnp.sum(p_t * jnp.log(p_t / p_s))
    rkl = jnp.sum(p_s * jnp.log(p_s / p_t))
    return jnp.select([route == G, route == F, route == R], [pg, lam * fkl, lam * rkl], 0.0)


def naive_trace_loss(student_logits, teacher_logits, tokens, old_logp, adv, route, lam, norm):
    per_token = jax.vmap(
        jax.vmap(naive_trace_token, in_axes=(0, 0, 0, 0, None, 0, None)),
        in_axes=(0, 0, 0, 0, 0, 0, None),
    )
    terms = per_token(student_logits, teacher_logits, tokens, old_logp, adv, route, lam)
    return naive_normalise(terms, np.asarray(route) != I, norm)


@pytest.mark.parametrize(
    "shape, norm",
    [
        ((1, 1, 3), "token"),
        ((2, 5, 7), "token"),
        ((3, 4, 5), "sequence"),  # row 2 is all IGNORE: left out of the sequence mean
    ],
)
def test_trace_loss_grad_vs_naive(shape, norm):
    B, T, V = shape
    ks = jax.random.split(jax.random.key(B * 100 + T * 10 + V), 6)
    student = jax.random.normal(ks[0], shape)
    teacher = jax.random.normal(ks[1], shape)
    tokens = jax.random.randint(ks[2], (B, T), 0, V)
    route = jax.random.randint(ks[3], (B, T), -1, 3).at[0, 0].set(G)
    if B == 3:
        route = route.at[2].set(I)
    adv = jax.random.normal(ks[4], (B,))
    take = lambda logits: jnp.take_along_axis(
        jax.nn.log_softmax(logits, -1), tokens[..., None], -1
    )[..., 0]
    old_logp = take(student) + 0.3 * jax.random.normal(ks[5], (B, T))  # off-policy: clipping
    lam = 0.37

    def lib(s):
        kl = L.routed_kl_from_logits(s, teacher, route)
        return L.trace_loss(take(s), old_logp, adv, route, kl, lam, eps_high=0.28, norm=norm)[0]

    def ref(s):
        return naive_trace_loss(s, teacher, tokens, old_logp, adv, route, lam, norm)

    (v_lib, g_lib), (v_ref, g_ref) = (jax.jit(jax.value_and_grad(f))(student) for f in (lib, ref))
    close(v_lib, v_ref)
    close(g_lib, g_ref)


def test_routed_kl_from_logits():
    ks, kt = jax.random.split(jax.random.key(3))
    s = jax.random.normal(ks, (2, 3, 5))
    t = jax.random.normal(kt, (2, 3, 5))
    route = jnp.array([[I, G, F], [R, F, I]])
    kl = L.routed_kl_from_logits(s, t, route)
    want = jnp.where(route == F, L.forward_kl(s, t), jnp.where(route == R, L.reverse_kl(s, t), 0.0))
    close(kl, want)
    assert kl.shape == (2, 3)
    with pytest.raises(ValueError, match="route_BxT"):
        L.routed_kl_from_logits(s, t, route[:, :2])


@pytest.mark.parametrize("mode", ["trace", "grpo", "opsd", "opsd+grpo"])
@pytest.mark.parametrize("norm", ["token", "sequence", "constant"])
def test_trace_loss_all_ignored_is_zero_not_nan(mode, norm):
    route = jnp.full((2, 3), I)
    junk = jnp.array([[jnp.nan, -jnp.inf, 1.0], [jnp.inf, 0.0, jnp.nan]])

    def f(lp):
        return L.trace_loss(lp, junk, jnp.ones(2), route, junk, 0.5, mode=mode, norm=norm)

    (loss, m), g = jax.value_and_grad(f, has_aux=True)(junk)
    assert float(loss) == 0.0
    assert bool(jnp.all(g == 0.0))
    assert all(bool(jnp.isfinite(v)) for v in m.values()), m


def test_trace_loss_junk_outside_routes_does_not_leak():
    kl = TR_KL.at[0, 0].set(jnp.nan).at[0, 3].set(jnp.inf)  # a GRPO and an IGNORE slot
    logp = TR_LOGP.at[0, 3].set(-jnp.inf)
    f = lambda lp: L.trace_loss(lp, jax.lax.stop_gradient(lp), TR_ADV, TR_ROUTE, kl, 0.5)[0]
    loss, g = jax.value_and_grad(f)(logp)
    close(loss, (0.5 + 0.5 * 1.2) / 7)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_trace_loss_jit_with_scheduled_lambda():
    @jax.jit
    def step_loss(step):
        lam = L.kl_coef(step, lambda0=0.5, warmup_steps=2, decay_steps=4)
        return tr_loss(lam)

    close(step_loss(0)[0], (0.5 + 0.5 * 1.2) / 7)
    close(step_loss(4)[1]["lambda"], 0.25)
    close(step_loss(4)[0], (0.5 + 0.25 * 1.2) / 7)
    close(step_loss(6)[0], -1 / 7)  # schedule over: plain GRPO


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kl_BxT=None), "kl_BxT"),
        (dict(kl_BxT=jnp.zeros((2, 3))), "kl_BxT"),
        (dict(route_BxT=jnp.zeros((2,), jnp.int32)), "route_BxT"),
        (dict(lam=-0.1), "lam"),
        (dict(mode="sft"), "mode"),
        (dict(norm="batch"), "norm"),
        (dict(adv_B=jnp.ones(3)), "adv"),
    ],
)
def test_trace_loss_bad_inputs(kwargs, match):
    args = dict(
        logp_BxT=TR_LOGP,
        old_logp_BxT=TR_LOGP,
        adv_B=TR_ADV,
        route_BxT=TR_ROUTE,
        kl_BxT=TR_KL,
        lam=0.5,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        L.trace_loss(**args)


@pytest.mark.parametrize("warmup", [0, 1, 5])
def test_optimizer_learning_rate_schedule(warmup):
    """The first update uses lr at once without warm-up, and ramps from 0 over `warmup` steps."""
    import optax  # noqa: PLC0415

    from jaxtrace import steps  # noqa: PLC0415

    lr = 0.1
    opt = steps.make_optimizer(lr, warmup, grad_clip=1e9, weight_decay=0.0, b1=0.0, b2=0.0)
    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    seen = []
    for _ in range(warmup + 2):
        # Adam with b1=b2=0 moves every parameter by exactly lr(t) against sign(grad).
        updates, state = opt.update({"w": jnp.ones(())}, state, params)
        seen.append(-float(optax.apply_updates(params, updates)["w"]))
    want = [lr * t / warmup for t in range(warmup)] + [lr, lr] if warmup else [lr, lr]
    np.testing.assert_allclose(seen, want, rtol=1e-5, atol=1e-7)
