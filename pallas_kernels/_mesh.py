"""Running a Pallas op on a device mesh, and the chip it compiles for.

Mosaic / Triton kernels cannot be partitioned by GSPMD: on a mesh of more than one device a
`pallas_call` must run inside `shard_map`, on each device's shard. Every op here is data
parallel over some leading dims (tokens, batch rows, heads), so the ops split those dims over the
mesh axes that divide them and run the single-device kernel on each shard; operands shared by
every shard (an unembedding, expert weights) are gathered whole, as FSDP gathers any weight for a
matmul, and their gradients are summed over the shards by autodiff (see `match_vma`).

The mesh is the one set with `jax.set_mesh(mesh)` (the trainer and `jaxtrace.compile` set it);
without one, or inside a `shard_map` already, the kernel is called directly.

The chip comes from the same mesh (its `abstract_device.device_kind`: "TPU v4", "TPU v5 lite", ...),
so an ahead-of-time compile for a TPU topology on a CPU host picks tiles for the target chip.
"""

from __future__ import annotations

import functools
import logging
import math

import jax

log = logging.getLogger(__name__)

_DEVICE_KINDS = {  # AbstractMesh.device_kind -> pltpu.ChipVersion value
    "TPU v4": "v4",
    "TPU v4 lite": "v4i",
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v5": "v5p",
    "TPU v5p": "v5p",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
    "TPU7x": "7x",
    "TPU 7x": "7x",
}
DEFAULT_VMEM_BYTES = 16 << 20  # the smallest VMEM of a current chip (v4): safe when unknown


def inside_shard_map() -> bool:
    """Whether some mesh axes are manual here (we are tracing a shard_map body)."""
    mesh = jax.sharding.get_abstract_mesh()
    manual = getattr(jax.sharding.AxisType, "Manual", None)
    return mesh is not None and any(t == manual for t in getattr(mesh, "axis_types", ()))


def context_mesh():
    """The mesh set by `jax.set_mesh`, or None when there is none, it has one device, or some of
    its axes are already manual (we are inside a shard_map)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or not mesh.axis_names or math.prod(mesh.shape.values()) == 1:
        return None
    return None if inside_shard_map() else mesh


def target_platform() -> str:
    """The platform being compiled for: the context mesh's ("tpu" for an ahead-of-time compile
    for a TPU topology on a CPU host), else `jax.default_backend()`."""
    return _context_device("platform") or jax.default_backend()


def _context_device(attr: str):
    """`attr` (platform, device_kind, num_cores) of the context mesh's devices
    (`AbstractMesh.abstract_device`), or None without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or not mesh.axis_names:
        return None
    return getattr(mesh.abstract_device, attr, None)


def tpu_info():
    """`pltpu.TpuInfo` of the chip being compiled for (the context mesh's, else the local
    backend's), or None when that is not a known TPU."""
    try:
        from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
    except ImportError:  # pragma: no cover - jax without Pallas TPU
        return None
    kind = _context_device("device_kind")
    cores = _context_device("num_cores") or 1
    if kind is None:
        try:
            device = jax.devices()[0]
        except RuntimeError:
            return None
        kind = device.device_kind
        cores = getattr(device, "num_cores", None) or 1
    version = _DEVICE_KINDS.get(kind)
    if version is None:
        return None
    try:
        return pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(version), cores)
    except (ValueError, TypeError, NotImplementedError) as e:  # a chip this jax has no table for
        _warn_no_table(kind, f"{type(e).__name__}: {e}")
        return None  # callers then assume the smallest VMEM (DEFAULT_VMEM_BYTES): safe tiles


@functools.cache
def _warn_no_table(kind: str, why: str) -> None:
    log.warning("no TPU info for %r (%s): kernels tile for the smallest VMEM", kind, why)


def vmem_bytes() -> int:
    """VMEM capacity of one TensorCore of the target chip (16 MiB when unknown)."""
    info = tpu_info()
    return int(info.vmem_capacity_bytes) if info is not None else DEFAULT_VMEM_BYTES


def split_axes(mesh, size: int, exclude=()) -> tuple[str, ...]:
    """Mesh axes (of size > 1, in mesh order, not in `exclude`) to split a dim of `size` over:
    greedily every axis whose size still divides what is left."""
    axes, left = [], size
    for name in mesh.axis_names:
        n = mesh.shape[name]
        if n > 1 and name not in exclude and left % n == 0:
            axes.append(name)
            left //= n
    return tuple(axes)


def spec_entry(axes):
    """A PartitionSpec entry for `axes` (None, one name, or a tuple)."""
    return None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))


def shard_map(fn, mesh, in_specs, out_specs):
    """`jax.shard_map` over `mesh` (the abstract context mesh works) for a body that calls
    Pallas kernels. `check_vma=False`: a `pallas_call`'s outputs carry no varying-axes type.
    Autodiff is then the classic shard_map transpose: the cotangent of an input replicated over
    some axes is summed over them (a gathered weight's gradient over its token shards)."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def shard_map_some(fn, mesh, args, in_specs, out_specs):
    """`shard_map(fn, mesh, in_specs, out_specs)(*args)` where some optional args are None: those
    do not cross the shard_map boundary (their spec is ignored) and reach `fn` as None."""
    present = [i for i, a in enumerate(args) if a is not None]

    def body(*xs):
        full = [None] * len(args)
        for i, x in zip(present, xs):
            full[i] = x
        return fn(*full)

    specs = tuple(in_specs[i] for i in present)
    return shard_map(body, mesh, specs, out_specs)(*(args[i] for i in present))
