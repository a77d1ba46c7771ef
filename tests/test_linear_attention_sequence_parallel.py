"""linear_attention_sequence_parallel over 8 forced CPU devices == the unsharded op.

The device count must be fixed before jax initialises, which pytest may already have done in
this process, so the check runs in a fresh interpreter."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from pallas_kernels.linear_attention import linear_attention_sequence_parallel
    from pallas_kernels.linear_attention import reference as ref

    assert jax.device_count() == 8, jax.devices()
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=auto)
    r = np.random.default_rng(0)
    b, t, h, kv, dk, dv = 2, 36, 4, 2, 8, 8
    q = jnp.asarray(r.normal(size=(b, t, h, dk)) * 0.5, jnp.float32)
    k = jnp.asarray(r.normal(size=(b, t, kv, dk)) * 0.5, jnp.float32)
    v = jnp.asarray(r.normal(size=(b, t, kv, dv)), jnp.float32)
    log_g = jnp.asarray(-r.uniform(0, 0.5, size=(b, t, h)), jnp.float32)
    s0 = jnp.asarray(r.normal(size=(b, h, dk, dv)), jnp.float32)

    def close(a, b, tol):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol,
                                   atol=tol * (1 + float(np.abs(b).max())))

    for g, init in [(log_g, s0), (None, None)]:
        sp = jax.jit(lambda q, k, v, g, s: linear_attention_sequence_parallel(
            q, k, v, g, mesh=mesh, axis_name="seq", initial_state=s, chunk_size=4))
        o, s = sp(q, k, v, g, init)
        o_ref, s_ref = ref.linear_attention_reference(q, k, v, g, init)
        close(o, o_ref, 1e-5)
        close(s, s_ref, 1e-5)

    loss = lambda f: lambda q, k, v, g, s: (
        jnp.sum(jnp.sin(f(q, k, v, g, s)[0])) + jnp.sum(f(q, k, v, g, s)[1] ** 2))
    sp = lambda q, k, v, g, s: linear_attention_sequence_parallel(
        q, k, v, g, mesh=mesh, axis_name="seq", initial_state=s, chunk_size=4)
    grads = jax.jit(jax.grad(loss(sp), argnums=range(5)))(q, k, v, log_g, s0)
    grads_ref = jax.grad(loss(ref.linear_attention_reference), argnums=range(5))(
        q, k, v, log_g, s0)
    for a, b_ in zip(grads, grads_ref):
        close(a, b_, 1e-4)
    try:
        linear_attention_sequence_parallel(q[:, :35], k[:, :35], v[:, :35], mesh=mesh,
                                           axis_name="seq")
        raise AssertionError("T=35 over 4 shards should raise")
    except ValueError as e:
        assert "T=35" in str(e)
    print("SP_OK")
    """
)


@pytest.mark.slow
def test_sequence_parallel_matches_unsharded():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0 and "SP_OK" in proc.stdout, proc.stderr[-4000:]
