"""Hardware a run can be planned for, and its compile-only devices.

A target is a TPU slice (`v5e-256`, `v5p-128`, `v4-32`, `v6e-8`) or a GPU node
(`h100x8`, `h200x8`, `a100x8`; `h100x16` is two nodes of 8). TPU slice sizes
follow Cloud TPU's names: v5e and v6e count chips, v4 and v5p count
TensorCores (two per chip, one megacore device). `devices()` returns devices
that XLA compiles for without the hardware:

- TPU: libtpu's compile-only topology (`jax.experimental.topologies`), as
  MaxText's train_compile.py uses it. Needs the `tpu` extra (libtpu).
- GPU: the CUDA PJRT plugin's deviceless topology, described by an XLA
  `GpuTargetConfigProto` (core/plan/gpu_specs/, copied from XLA). Needs the
  `plan-gpu` extra (the plugin, without the CUDA wheels).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Iterator

from core.errors import UserError

GPU_SPECS = Path(__file__).resolve().parent / "gpu_specs"
GIB = 1024**3

# XLA's GPU client takes 75% of the memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION);
# the GPU compiler never fails on overflow, so the plan compares its peak with this.
GPU_USABLE_FRACTION = 0.75


class TargetError(UserError, ValueError):
  """A target name that does not describe hardware ablax can plan for, or a missing extra."""


@dataclasses.dataclass(frozen=True)
class Family:
  """One accelerator generation.

  Attributes:
    platform: 'tpu' or 'gpu'.
    hbm_bytes: memory per device.
    device: the name core.tracking.carbon knows it by (power and peak FLOP/s).
    topology_prefix / chip_config / dims: how libtpu names the slice: a 2-D
      (v5e, v6e) or 3-D (v4, v5p) chip grid.
    cores_per_chip: TensorCores in one slice-size unit ('v5p-128' is 64 chips).
    accelerator: Cloud TPU's accelerator-type prefix ('v5litepod' in 'v5litepod-256').
    spec: the GPU target-config file in gpu_specs/.
    source: where the memory figure comes from.
  """

  platform: str
  hbm_bytes: int
  device: str
  topology_prefix: str = ""
  chip_config: str = "default"
  dims: int = 2
  cores_per_chip: int = 1
  accelerator: str = ""
  spec: str = ""
  source: str = ""


FAMILIES: dict[str, Family] = {
  "v5e": Family(
    "tpu",
    16 * GIB,
    "tpu-v5e",
    "v5e",
    dims=2,
    accelerator="v5litepod",
    source="Cloud TPU v5e: 16 GiB HBM2 per chip",
  ),
  "v6e": Family(
    "tpu",
    32 * GIB,
    "tpu-v6e",
    "v6e",
    dims=2,
    accelerator="v6e",
    source="Cloud TPU v6e (Trillium): 32 GiB HBM per chip",
  ),
  "v4": Family(
    "tpu",
    32 * GIB,
    "tpu-v4",
    "v4",
    chip_config="megacore",
    dims=3,
    cores_per_chip=2,
    accelerator="v4",
    source="Cloud TPU v4: 32 GiB HBM2 per chip",
  ),
  "v5p": Family(
    "tpu",
    95 * GIB,
    "tpu-v5p",
    "v5",
    chip_config="megacore",
    dims=3,
    cores_per_chip=2,
    accelerator="v5p",
    source="Cloud TPU v5p: 95 GiB HBM2e per chip",
  ),
  "a100": Family(
    "gpu",
    85100068864,
    "a100-sxm",
    spec="a100_sxm_80.txtpb",
    source="XLA target config a100_sxm_80 (device_memory_size)",
  ),
  "h100": Family(
    "gpu",
    84942979072,
    "h100-sxm",
    spec="h100_sxm.txtpb",
    source="XLA target config h100_sxm (device_memory_size)",
  ),
  "h200": Family(
    "gpu",
    151397597184,
    "h200-sxm",
    spec="h200.txtpb",
    source="XLA target config h200 (device_memory_size)",
  ),
}

GPUS_PER_NODE = 8
_TPU_NAME = re.compile(r"^(v5e|v6e|v4|v5p)-(\d+)$")
_GPU_NAME = re.compile(r"^(a100|h100|h200)x(\d+)$")


@dataclasses.dataclass(frozen=True)
class Target:
  """A slice or node to compile for.

  Attributes:
    name: as the user wrote it, e.g. 'v5p-128'.
    family: the accelerator generation.
    num_devices: JAX devices (TPU chips, or megacore chips; GPUs).
    shape: the chip grid (TPU) or (nodes, 1, GPUs per node) (GPU).
  """

  name: str
  family: Family
  num_devices: int
  shape: tuple[int, ...]

  @property
  def platform(self) -> str:
    return self.family.platform

  @property
  def topology_name(self) -> str:
    """libtpu's name of the slice ('v5e:16x16', 'v5:4x4x4'); '' on GPU."""
    if self.platform != "tpu":
      return ""
    return f"{self.family.topology_prefix}:{'x'.join(map(str, self.shape))}"

  @property
  def accelerator_type(self) -> str:
    """Cloud TPU's name of the slice, e.g. 'v5litepod-256', 'v5p-128'; '' on GPU."""
    if self.platform != "tpu":
      return ""
    return f"{self.family.accelerator}-{self.num_devices * self.family.cores_per_chip}"

  @property
  def usable_bytes(self) -> int:
    """What the run may use per device: all of HBM on TPU (the compiler checks it)."""
    if self.platform == "tpu":
      return self.family.hbm_bytes
    return int(self.family.hbm_bytes * GPU_USABLE_FRACTION)

  def devices(self) -> list:
    """Compile-only devices of the target (no hardware needed)."""
    from jax.experimental import topologies  # local: only planning needs it

    if self.platform == "tpu":
      _check_installed("libtpu", "tpu")
      # libtpu takes a lock file per process and asks the metadata server for the
      # slice's hosts and type; none of that applies to a compile on this machine.
      # Only while libtpu starts: left in the environment, these variables make JAX
      # (and every child process) believe it runs on a TPU pod.
      with _environment(
        ALLOW_MULTIPLE_LIBTPU_LOAD="1",
        TPU_WORKER_HOSTNAMES="localhost",
        TPU_SKIP_MDS_QUERY="1",
        TPU_ACCELERATOR_TYPE=self.accelerator_type,
      ):
        topology = topologies.get_topology_desc(
          platform="tpu",
          topology_name=self.topology_name,
          chip_config_name=self.family.chip_config,
          chips_per_host_bounds=(2, 2, 1),
          num_slices=1,
        )
    else:
      _check_installed("jax_plugins.xla_cuda12", "plan-gpu")
      nodes, _, per_node = self.shape
      topology = topologies.get_topology_desc(
        topology_name="",
        platform="cuda",
        topology=f"{nodes}x1x{per_node}",
        target_config=(GPU_SPECS / self.family.spec).read_text(),
      )
    devices = list(topology.devices)
    if len(devices) != self.num_devices:
      raise TargetError(
        f"{self.name}: the compiler's topology has {len(devices)} devices, "
        f"expected {self.num_devices}"
      )
    return devices


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
  """Sets the variables the user has not set, and removes them again afterwards."""
  added = {k: v for k, v in values.items() if k not in os.environ}
  os.environ.update(added)
  try:
    yield
  finally:
    for key in added:
      os.environ.pop(key, None)


def _check_installed(module: str, extra: str) -> None:
  import importlib.util  # pylint: disable=g-import-not-at-top

  if importlib.util.find_spec(module) is None:
    raise TargetError(f"planning for this target needs {module}: pip install -e '.[{extra}]'")


def _grid(chips: int, dims: int) -> tuple[int, ...]:
  """The most cubic power-of-two grid of `chips` (how Cloud TPU shapes its slices)."""
  if chips < 1 or chips & (chips - 1):
    raise TargetError(f"a TPU slice has a power-of-two number of chips, got {chips}")
  shape = [1] * dims
  for i in range(int(math.log2(chips))):
    # Grow the smallest axis, the last first: 4 -> 2x2, 8 -> 2x4, 128 -> 4x4x8.
    axis = min(range(dims), key=lambda a: (shape[a], -a))
    shape[axis] *= 2
  return tuple(sorted(shape))


def parse_target(name: str) -> Target:
  """'v5p-128' / 'h100x8' -> Target, or an error listing the accepted forms."""
  m = _TPU_NAME.match(name)
  if m:
    family = FAMILIES[m.group(1)]
    size = int(m.group(2))
    if size % family.cores_per_chip:
      raise TargetError(
        f"{name}: {m.group(1)} slices are named by TensorCores, two per chip; {size} is odd"
      )
    chips = size // family.cores_per_chip
    return Target(name, family, chips, _grid(chips, family.dims))
  m = _GPU_NAME.match(name)
  if m:
    family, count = FAMILIES[m.group(1)], int(m.group(2))
    if count < 1 or (count > GPUS_PER_NODE and count % GPUS_PER_NODE):
      raise TargetError(
        f"{name}: GPU nodes hold {GPUS_PER_NODE} GPUs; give up to "
        f"{GPUS_PER_NODE} or a multiple of it"
      )
    nodes = max(1, count // GPUS_PER_NODE)
    return Target(name, family, count, (nodes, 1, count // nodes))
  raise TargetError(
    f"unknown target {name!r}: use a TPU slice v5e-N, v6e-N (N chips), v4-N, v5p-N "
    "(N TensorCores, e.g. v5p-128), or a GPU node a100xN, h100xN, h200xN"
  )
