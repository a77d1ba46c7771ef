"""Shared test set-up: CPU only, float32 matmuls at full precision, the repo's shared data."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight host devices for the sharding tests; must be set before jax initialises its backend.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA} (tests read ../shared/data)")
    return SHARED_DATA


@pytest.fixture
def tpu_decode_order(monkeypatch):
    """The rollout engine traced as on TPU, here on CPU: the slot cache stored token-major
    (`engine.slots_token_major`) and decode loops on the layer scan. The module-level jits are
    cleared before and after, so no test traces one order and runs the other."""
    from jaxtrace.models import qwen3
    from jaxtrace.rollout import engine

    monkeypatch.setattr(engine, "slots_token_major", lambda: True)
    monkeypatch.setattr(qwen3, "unstacked_decode", lambda: False)
    jax.clear_caches()
    yield
    monkeypatch.undo()
    jax.clear_caches()
