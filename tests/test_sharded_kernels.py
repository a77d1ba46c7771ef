"""Pallas ops on a device mesh: under `jax.set_mesh` each op runs through shard_map (Mosaic and
Triton kernels cannot be partitioned by XLA) and must give the unsharded op's values and
gradients. Interpret mode on 8 CPU devices, odd token counts, every mesh layout the configs use
(data / fsdp / tensor, and the expert axis)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import moe_dispatch, span_kl
from pallas_kernels.linear_attention import hybrid_attention

MESHES = [("data", "fsdp", "tensor"), ("data", "expert", "tensor")]


def _mesh(axes):
    return Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), axes)


def _close(got, want, tol=1e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = float(jnp.max(jnp.abs(w))) + 1e-30
        assert float(jnp.max(jnp.abs(g - w))) <= tol * scale


@pytest.mark.parametrize("num_tokens", [200, 37])  # all 8 devices; no mesh axis divides 37
@pytest.mark.parametrize("axes", MESHES)
def test_span_kl_on_a_mesh(num_tokens, axes):
    mesh = _mesh(axes)
    d, v = 64, 300
    k = jax.random.split(jax.random.key(0), 4)
    h, ht = jax.random.normal(k[0], (num_tokens, d)), jax.random.normal(k[1], (num_tokens, d))
    w = jax.random.normal(k[2], (d, v)) * 0.3
    route = jax.random.randint(k[3], (num_tokens,), 0, 3)

    def loss(h, w, impl):
        kl = span_kl.span_kl(h, w, route, h_teacher_TxD=ht, implementation=impl, block_t=32)
        return jnp.sum(kl**2)

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    want = grad(h, w, "reference")
    with jax.set_mesh(mesh):
        rows = axes[:2] if num_tokens % 4 == 0 else None
        hs = jax.device_put(h, NamedSharding(mesh, P(rows, None)))
        ws = jax.device_put(w, NamedSharding(mesh, P(axes[1], "tensor")))
        got = jax.jit(grad, static_argnums=2)(hs, ws, "interpret")
    _close(got, want)


@pytest.mark.parametrize("num_tokens", [200, 37])
@pytest.mark.parametrize("impl", ["xla", "pallas_tpu"])  # every non-reference name runs one path
def test_token_logprobs_on_a_mesh_runs_on_each_devices_tokens(num_tokens, impl):
    """The chunked log-prob op on a mesh: each device loops over its own token blocks (under
    shard_map), values and gradients as without a mesh; its program holds no gathered copy of
    every token's hidden state."""
    mesh = _mesh(MESHES[0])
    d, v = 64, 300
    k = jax.random.split(jax.random.key(1), 3)
    h = jax.random.normal(k[0], (num_tokens, d))
    w = jax.random.normal(k[1], (d, v)) * 0.3
    targets = jax.random.randint(k[2], (num_tokens,), 0, v)

    def loss(h, w, impl):
        logp, entropy = span_kl.token_logprobs(h, w, targets, implementation=impl, block_t=16)
        return jnp.sum(logp**2) + jnp.sum(entropy)

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    want = grad(h, w, "reference")
    with jax.set_mesh(mesh):
        rows = ("data", "fsdp") if num_tokens % 4 == 0 else None
        hs = jax.device_put(h, NamedSharding(mesh, P(rows, None)))
        ws = jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor")))
        step = jax.jit(grad, static_argnums=2)
        got = step(hs, ws, impl)
        hlo = step.lower(hs, ws, impl).compile().as_text()
    _close(got, want)
    if rows:  # every token on every device: what XLA did with the loop on the global array
        gathered = re.findall(rf"f32\[{num_tokens},{d}\][^\n]* all-gather\(", hlo)
        assert not gathered, gathered


@pytest.mark.parametrize("axes", MESHES)
def test_moe_ffn_on_a_mesh(axes):
    """Pallas grouped matmuls: tokens split over the mesh, experts gathered, or split over the
    expert axis (expert parallelism); the expert counts are global."""
    mesh = _mesh(axes)
    t, d, f, e, top_k = 40, 32, 48, 4, 2
    ks = jax.random.split(jax.random.key(1), 5)
    x, logits = jax.random.normal(ks[0], (t, d)), jax.random.normal(ks[1], (t, e))
    wg, wu = (jax.random.normal(k, (e, d, f)) * 0.2 for k in ks[2:4])
    wd = jax.random.normal(ks[4], (e, f, d)) * 0.2

    def loss(x, wg, wu, wd, impl):
        tiling = (16, 128, 128) if impl == "interpret" else None
        y, stats = moe_dispatch.moe_ffn(
            x, logits, wg, wu, wd, top_k=top_k, implementation=impl, tiling=tiling
        )
        return jnp.sum(jnp.sin(y)), stats.tokens_per_expert_E

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    (want_loss, want_counts), want_grads = grad(x, wg, wu, wd, "reference")
    with jax.set_mesh(mesh):
        (got_loss, got_counts), got_grads = jax.jit(grad, static_argnums=4)(
            x, wg, wu, wd, "interpret"
        )
    _close(got_loss, want_loss)
    np.testing.assert_array_equal(got_counts, want_counts)
    _close(got_grads, want_grads)


def test_hybrid_attention_on_a_mesh():
    mesh = _mesh(MESHES[0])
    b, t, h, kv, hd = 4, 37, 4, 2, 16
    ks = jax.random.split(jax.random.key(2), 4)
    q = jax.random.normal(ks[0], (b, t, h, hd))
    k, v = (jax.random.normal(kk, (b, t, kv, hd)) for kk in ks[1:3])
    log_g = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, h)))
    alpha = jnp.linspace(0.2, 0.8, h)

    def loss(q, k, v, alpha, impl):
        o = hybrid_attention(
            q, k, v, None, None, log_g, window=8, alpha=alpha, beta=1 - alpha, chunk_size=16,
            block_size=16, implementation=impl,
        )  # fmt: skip
        return jnp.sum(jnp.sin(o))

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    want = grad(q, k, v, alpha, "xla")
    with jax.set_mesh(mesh):
        got = jax.jit(grad, static_argnums=4)(q, k, v, alpha, "interpret")
    _close(got, want)


def test_without_a_mesh_the_kernel_runs_directly():
    """No mesh set (a notebook on one device): the op is the plain kernel call, no shard_map."""
    h, w = jnp.ones((20, 16)), jnp.ones((16, 130))
    route = jnp.ones((20,), jnp.int32)
    jaxpr = jax.make_jaxpr(
        lambda h, w: span_kl.span_kl(h, w, route, h_teacher_TxD=h, implementation="interpret")
    )(h, w)
    assert "shard_map" not in str(jaxpr)
