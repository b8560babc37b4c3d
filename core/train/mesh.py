"""The device mesh: axes ('data', 'fsdp', 'tensor') with sizes from the config.

Axis types are Auto: jax >= 0.7 makes `jax.make_mesh` default to Explicit axes,
under which the model's `with_sharding_constraint` calls (core.model.sharding)
would change meaning. Devices are taken in the order JAX lists them, never by
id: ids are not contiguous across processes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from core.errors import UserError

logger = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")


class MeshError(UserError, ValueError):
  """Mesh sizes that do not fit the devices."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; one of them may be -1, meaning "all remaining devices".

  Attributes:
    data: pure data parallelism (replicated parameters).
    fsdp: data parallelism with parameters and optimizer state sharded (ZeRO-3).
    tensor: model parallelism over heads and the MLP hidden dimension.
  """

  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def shape(self, device_count: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
      raise MeshError(f"at most one mesh axis may be -1, got {dict(zip(AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
      raise MeshError(f"mesh sizes must be positive or -1, got {dict(zip(AXES, sizes))}")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
      if device_count % fixed:
        raise MeshError(
          f"{device_count} devices cannot be split into mesh "
          f"{dict(zip(AXES, sizes))}: {fixed} does not divide {device_count}"
        )
      sizes[free[0]] = device_count // fixed
    if math.prod(sizes) != device_count:
      raise MeshError(
        f"mesh {dict(zip(AXES, sizes))} has {math.prod(sizes)} devices, "
        f"but {device_count} are in use"
      )
    return tuple(sizes)


def make_mesh(
  config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A mesh over `devices` (default: every device of every process)."""
  config = config or MeshConfig()
  devices = list(jax.devices() if devices is None else devices)
  shape = config.shape(len(devices))
  auto = (AxisType.Auto,) * len(AXES)
  # jax.make_mesh orders devices for the physical topology (ICI rings on TPU), for
  # any device list: a subset, or compile-only topology devices, get the groups
  # the real slice would get, so the mesh that is planned is the mesh that runs.
  try:
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
  except NotImplementedError as e:
    # A 3-D torus (v4, v5p) maps a mesh axis onto whole physical axes only, e.g. no
    # 8-way axis on 4x4x4. Splitting a physical axis still runs, with collectives
    # that span partial rings.
    logger.warning(
      "mesh %s does not map onto whole physical axes (%s); splitting them",
      dict(zip(AXES, shape)),
      e,
    )
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, AXES, axis_types=auto)


def describe(mesh: Mesh) -> str:
  return " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
