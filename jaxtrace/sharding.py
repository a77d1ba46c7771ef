"""Device mesh, logical-axis rules and NamedShardings for params and batches.

Params carry logical axis names (see `jaxtrace.models.logical_axes`); one rules table maps each
name to a mesh axis (or None = replicated). A dimension that a mesh axis does not divide is
replicated rather than failing, so one rules table serves every model size.

    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    graphdef, params = init_sharded(model_cfg, mesh, seed=0)   # abstract init, then sharded init
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axis (a tuple shards over several). Order matters only for readability.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("norm", None),
    ("layers", None),  # the stacked decoder layers' leading axis (scanned over, never split)
)

# Decode layouts of the weights (`rollout.decode_layout`, `jaxtrace.rollout.layout`): the rules
# the sampler's copy of the params is placed by. "train" is DEFAULT_RULES (FSDP: every decode
# step all-gathers the weights). "replicated": every weight whole on every chip, the batch split
# over the data axes (pure data-parallel decode; the usual choice when the weights fit one chip).
# "tensor": tensor-parallel over the "tensor" axis, the FSDP axis replicated (no weight gathers;
# Megatron-style collectives on the activations instead).
DECODE_LAYOUTS = ("train", "replicated", "tensor")
REPLICATED_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
)
TENSOR_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = tuple(
    (name, None if target == "fsdp" else target) for name, target in DEFAULT_RULES
)


def decode_rules(layout: str):
    """The rules table of a decode layout (one of DECODE_LAYOUTS)."""
    tables = {"train": DEFAULT_RULES, "replicated": REPLICATED_RULES, "tensor": TENSOR_RULES}
    if layout not in tables:
        raise ValueError(f"decode layout {layout!r}; choose from {DECODE_LAYOUTS}")
    return tables[layout]


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with the named axes; one size may be -1 (fill with the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(axes)
    unknown = [n for n in names if n not in MESH_AXES]
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown[0]!r}; mesh axes are {MESH_AXES}")
    sizes = [int(axes[n]) for n in names]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(axes)}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {dict(axes)}: sizes must be positive or -1")
    fixed = math.prod(s for s in sizes if s != -1)
    if len(devices) % fixed:
        raise ValueError(
            f"mesh {dict(axes)} needs a multiple of {fixed} devices, but there are {len(devices)}"
        )
    sizes = [len(devices) // fixed if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(names, sizes))} has {math.prod(sizes)} slots for "
            f"{len(devices)} devices; the axis sizes must multiply to the device "
            "count (use -1 on one axis to fill)"
        )
    try:
        from jax.experimental import mesh_utils  # noqa: PLC0415

        grid = mesh_utils.create_device_mesh(sizes, devices)
    except (ValueError, NotImplementedError, AssertionError) as e:
        # mesh_utils knows the physical topologies it can lay out; elsewhere (an unusual slice
        # shape, a device subset) the devices go in id order, which is correct but may put
        # a mesh axis across slower links.
        log.warning("mesh %s: devices in id order (%s: %s)", sizes, type(e).__name__, e)
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, names)


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES
) -> PartitionSpec:
    """The PartitionSpec of one array: each logical name through the rules, replicated where the
    mesh axis is absent, of size 1, already used, or does not divide the dimension."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(
            t for t in targets if t in mesh.shape and mesh.shape[t] > 1 and t not in used
        )
        size = math.prod(mesh.shape[t] for t in targets)
        if not targets or dim % size:
            spec.append(None)
            continue
        used.update(targets)
        spec.append(targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def abstract_placed(model_cfg, mesh: Mesh):
    """(graphdef, params as ShapeDtypeStructs on their `param_shardings`): the target of a
    sharded restore."""
    from jaxtrace.models import abstract_model  # noqa: PLC0415

    graphdef, abstract = abstract_model(model_cfg)
    place = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    return graphdef, jax.tree.map(place, abstract, param_shardings(model_cfg, mesh))


def param_shardings(model_cfg, mesh: Mesh, rules=DEFAULT_RULES):
    """A params-shaped tree of NamedSharding for `model_cfg`."""
    from jaxtrace.models import abstract_model, logical_axes  # noqa: PLC0415

    _, abstract = abstract_model(model_cfg)
    return jax.tree.map(
        lambda axes, leaf: NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh, rules)),
        logical_axes(model_cfg),
        abstract,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=DEFAULT_RULES) -> NamedSharding:
    """Shards the leading (batch) dimension over the data-parallel axes."""
    target = dict(rules)["batch"]
    axes = tuple(
        a
        for a in ((target,) if isinstance(target, str) else target)
        if a in mesh.shape and mesh.shape[a] > 1
    )
    lead = axes if len(axes) > 1 else (axes[0] if axes else None)
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def axes_size(mesh: Mesh, axes) -> int:
    """Devices a PartitionSpec entry (None, an axis name or a tuple of names) splits a dimension
    over on `mesh`; axes the mesh lacks count 1."""
    if axes is None:
        return 1
    return math.prod(mesh.shape.get(a, 1) for a in ((axes,) if isinstance(axes, str) else axes))


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    return axes_size(mesh, dict(rules)["batch"])


def shard_batch(batch, mesh: Mesh):
    """Places a host batch (a pytree of arrays with a common leading dim) on the mesh."""
    dp = data_parallel_size(mesh)

    def put(x):
        x = np.asarray(x)
        if x.ndim and x.shape[0] % dp:
            raise ValueError(
                f"batch dimension {x.shape[0]} is not divisible by the "
                f"data-parallel size {dp} of mesh {dict(mesh.shape)}"
            )
        return jax.device_put(
            x,
            batch_sharding(mesh, max(x.ndim, 1))
            if x.ndim
            else NamedSharding(mesh, PartitionSpec()),
        )

    return jax.tree.map(put, batch)


def shard_step_batch(batch, mesh: Mesh):
    """A train-step batch on the mesh: its [R, ...] arrays split over the data axes, and the
    group prompts (`prompt`, `prompt_valid`: G rows for R = G * k responses, see
    `steps.response_hidden`) split too when G divides, else replicated (they are small)."""
    prompts = {k: batch[k] for k in ("prompt", "prompt_valid") if k in batch}
    rest = {k: v for k, v in batch.items() if k not in prompts}
    return {**shard_batch(rest, mesh), **shard_rows(prompts, mesh)}


def shard_rows(batch, mesh: Mesh | None):
    """Sampler inputs on the mesh: split over the data axes when the rows divide evenly, else
    replicated (correct, but then every device decodes every row). With params replicated on a
    mesh, host arrays left unplaced would make every device repeat the whole decode."""
    if mesh is None:
        return batch
    rows = {np.shape(x)[0] for x in jax.tree.leaves(batch) if np.ndim(x)}
    if len(rows) == 1 and rows.pop() % data_parallel_size(mesh) == 0:
        return shard_batch(batch, mesh)
    return jax.device_put(batch, replicated(mesh))


def to_host(tree):
    """numpy copies of the *global* arrays in `tree`, on every process (a multi-process mesh
    leaves each process only its own shards)."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def mesh_context(mesh: Mesh | None):
    """`jax.set_mesh(mesh)`, or no context for None: Pallas ops look the mesh up here to run
    under shard_map (`pallas_kernels._mesh`)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def init_sharded(model_cfg, mesh: Mesh, seed: int = 0, rules=DEFAULT_RULES):
    """Abstract init (`jax.eval_shape`), then a jitted init that writes each param straight into
    its shard: no host ever holds the full model. Returns (graphdef, params)."""
    from jaxtrace.models import abstract_model, create  # noqa: PLC0415

    shardings = param_shardings(model_cfg, mesh, rules)
    params = jax.jit(lambda: create(model_cfg, seed)[1], out_shardings=shardings)()
    graphdef, _ = abstract_model(model_cfg)
    return graphdef, params
