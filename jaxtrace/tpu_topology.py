"""Cloud TPU slice names as users write them (v5p-8, v5litepod-16, v6e-64, ...) -> the devices of
that slice for ahead-of-time compilation, and the published figures of its chip.

`devices("v5p-8")` needs libtpu (`pip install "jax[tpu]"`) but no TPU: libtpu describes the
topology and XLA:TPU / Mosaic compile against it on any host. Chip figures (HBM, peak bf16
FLOP/s, HBM bandwidth, VMEM) come from jax's own table (`pltpu.get_tpu_info_for_chip`).

Naming, as Google Cloud does: v4-N and v5p-N count TensorCores (two per chip, one "megacore"
device per chip), v5e-N / v5litepod-N and v6e-N count chips. An explicit libtpu topology
(`v5p:4x4x12`, `v6e:2x4`) is accepted too, for shapes the rule below does not produce.
"""

from __future__ import annotations

import dataclasses
import math
import re

# generation -> (libtpu name, pltpu chip version, TensorCores per device, dims, chips per host)
_GENERATIONS = {
    "v4": ("v4", "v4", 2, 3, 4),
    "v5p": ("v5p", "v5p", 2, 3, 4),
    "v5e": ("v5e", "v5e", 1, 2, 8),
    "v6e": ("v6e", "v6e", 1, 2, 8),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6litepod": "v6e"}
INSTALL_HINT = (
    'libtpu is not installed: `pip install "jax[tpu]==$(python -c "import jax; '
    'print(jax.__version__)")"` (or `make venv-tpu`); no TPU is needed to compile for one'
)


class TopologyError(ValueError):
    """A topology name that cannot be understood."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. "v5p-8"
    generation: str  # v4 | v5p | v5e | v6e
    shape: tuple[int, ...]  # chips per dimension, e.g. (2, 2, 1)
    cores_per_device: int

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        return f"{_GENERATIONS[self.generation][0]}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host(self) -> tuple[int, int, int]:
        per_host = _GENERATIONS[self.generation][4]
        if self.num_devices <= per_host:  # one host holds the whole slice
            return tuple(self.shape) + (1,) * (3 - len(self.shape))
        return (2, 2, 1)

    @property
    def num_hosts(self) -> int:
        return self.num_devices // math.prod(self.chips_per_host)


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """Google Cloud's slice shapes: 3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (the
    rightmost smallest dimension doubles); 2-D 2x2, 2x4, 4x4, 4x8, 8x8, ..."""
    if chips & (chips - 1):
        raise TopologyError(
            f"{chips} chips is not a power of two: give the topology explicitly, e.g. v5p:4x4x12"
        )
    shape = [1] * dims
    while math.prod(shape) < chips:
        if dims == 2:
            shape[1 if shape[0] == shape[1] else 0] *= 2
        elif math.prod(shape) < 4:
            shape[0 if shape[0] == shape[1] else 1] *= 2
        else:
            smallest = min(shape)
            shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
    return tuple(shape)


def parse(name: str) -> Topology:
    """'v5p-8' / 'v5litepod-16' / 'v6e-64' / 'v5p:4x4x12' -> Topology."""
    text = name.strip().lower()
    m = re.fullmatch(r"(v\d+[a-z]*)[-:]([\dx]+)", text)
    if not m:
        raise TopologyError(
            f"topology {name!r}: expected a slice name such as v5p-8, v5e-8, v6e-64, v4-8 or a "
            "libtpu topology such as v5p:2x2x1"
        )
    gen, size = m.groups()
    gen = _ALIASES.get(gen, gen)
    if gen not in _GENERATIONS:
        raise TopologyError(f"topology {name!r}: unknown TPU generation; known: {_known()}")
    _, _, cores, dims, _ = _GENERATIONS[gen]
    if "x" in size or ":" in text:
        shape = tuple(int(s) for s in size.split("x"))
        if len(shape) != dims or min(shape) < 1:
            raise TopologyError(f"topology {name!r}: {gen} slices have {dims} dimensions")
    else:
        count = int(size)
        if count < cores or count % cores:
            raise TopologyError(
                f"topology {name!r}: {gen}-N counts {'TensorCores' if cores > 1 else 'chips'}; "
                f"N must be a multiple of {cores}"
            )
        shape = _grid(count // cores, dims)
    return Topology(name, gen, shape, cores)


def _known() -> str:
    return ", ".join(sorted(_GENERATIONS) + sorted(_ALIASES))


def devices(topo: Topology):
    """The devices of the slice, from libtpu (no TPU needed). Raises RuntimeError with
    INSTALL_HINT when libtpu is missing."""
    from jax.experimental import topologies  # noqa: PLC0415

    try:
        import libtpu  # noqa: F401, PLC0415
    except ImportError as e:
        raise RuntimeError(INSTALL_HINT) from e
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topo.libtpu_name,
        chip_config_name="megacore" if topo.cores_per_device > 1 else "default",
        chips_per_host_bounds=topo.chips_per_host,
        num_slices=1,
    )
    return list(desc.devices)


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one device (a chip; both cores of a megacore chip)."""

    name: str
    hbm_bytes: int
    peak_flops: float  # bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    vmem_bytes: int  # per TensorCore


def chip(topo: Topology) -> Chip:
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

    version = pltpu.ChipVersion(_GENERATIONS[topo.generation][1])
    info = pltpu.get_tpu_info_for_chip(version, topo.cores_per_device)
    cores = topo.cores_per_device  # jax's figures are per TensorCore; a megacore device has two
    return Chip(
        name=topo.generation,
        hbm_bytes=int(info.hbm_capacity_bytes) * cores,
        peak_flops=float(info.bf16_ops_per_second) * cores,
        hbm_bandwidth=float(info.mem_bw_bytes_per_second) * cores,
        vmem_bytes=int(info.vmem_capacity_bytes),
    )
