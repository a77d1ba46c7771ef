"""Expert-parallel moe_ffn on 8 forced CPU devices == the unsharded reference (values, grads).

XLA reads the device-count flag once, when the backend starts, and another test module may have
started it already, so the checks run in a fresh subprocess (this file run as a script) and the
pytest process itself keeps its devices as they are.
"""

import os
import subprocess
import sys

import pytest

FORCE_8_DEVICES = "--xla_force_host_platform_device_count=8"


def _check(mesh_shape, axis_names, token_axes, num_experts, num_tokens, top_k, axis_type):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import moe_dispatch as md

    axis_type = getattr(jax.sharding.AxisType, axis_type)
    mesh = jax.make_mesh(mesh_shape, axis_names, axis_types=(axis_type,) * len(mesh_shape))
    keys = jax.random.split(jax.random.key(0), 6)
    d, f = 16, 24
    x = jax.random.normal(keys[0], (num_tokens, d))
    w_gate = jax.random.normal(keys[1], (num_experts, d, f)) / 4
    w_up = jax.random.normal(keys[2], (num_experts, d, f)) / 4
    w_down = jax.random.normal(keys[3], (num_experts, f, d)) / 5
    logits = jax.random.normal(keys[4], (num_tokens, num_experts))
    logits = logits.at[: num_tokens // 2, 0].add(4.0)  # a hot expert; some experts stay empty
    weights, ids, _ = md.route_topk(logits, top_k)
    cot = jax.random.normal(keys[5], (num_tokens, d))

    def loss(fn, x, weights, wg, wu, wd):
        return jnp.sum(fn(x, weights, ids, wg, wu, wd) * cot)

    def sharded(x, weights, ids, wg, wu, wd):
        y, stats = md.moe_ffn_expert_parallel(
            x, weights, ids, wg, wu, wd, mesh=mesh, token_axes=token_axes
        )
        return y

    args = (x, weights, w_gate, w_up, w_down)
    grad_fn = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=range(5)))
    got = grad_fn(sharded)(*args)
    want = grad_fn(md.moe_ffn_reference)(*args)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
    for name, g, w in zip(["x", "weights", "w_gate", "w_up", "w_down"], got[1], want[1]):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4, err_msg=name)
    y, stats = jax.jit(lambda *a: md.moe_ffn_expert_parallel(*a, mesh=mesh, token_axes=token_axes))(
        x, weights, ids, w_gate, w_up, w_down
    )
    np.testing.assert_allclose(y, md.moe_ffn_reference(x, weights, ids, *args[2:]), rtol=1e-4)
    counts = np.bincount(np.asarray(ids).reshape(-1), minlength=num_experts)
    np.testing.assert_array_equal(stats.tokens_per_expert_E, counts)
    assert int(stats.num_dropped) == 0


CASES = {
    "ep8_explicit_mesh": ((8,), ("expert",), ("expert",), 16, 24, 2, "Explicit"),
    "dp2_ep4": ((2, 4), ("data", "expert"), ("data", "expert"), 8, 16, 3, "Auto"),
    "ep4_tokens_replicated_over_expert": ((2, 4), ("data", "expert"), ("data",), 12, 10, 2, "Auto"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_expert_parallel_matches_unsharded(case):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FORCE_8_DEVICES).strip(),
        JAX_PLATFORMS="cpu",
    )
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), case],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK" in result.stdout


def test_bad_mesh_raises():
    import jax
    import jax.numpy as jnp

    from pallas_kernels import moe_dispatch as md

    mesh = jax.make_mesh((1,), ("expert",))
    w = jnp.zeros((3, 4, 4))
    with pytest.raises(ValueError, match="expert_axis"):
        md.moe_ffn_expert_parallel(
            jnp.zeros((2, 4)), jnp.zeros((2, 1)), jnp.zeros((2, 1), jnp.int32), w, w, w,
            mesh=mesh, expert_axis="ep",
        )  # fmt: skip


if __name__ == "__main__":
    # Must precede the first jax import of this process.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FORCE_8_DEVICES).strip()
    import jax

    assert jax.device_count() >= 8, jax.devices()
    _check(*CASES[sys.argv[1]])
    print("OK")
