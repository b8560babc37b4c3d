"""Logical-axis sharding hooks for activations, with no mesh knowledge in the model.

Model code names the logical axes of an activation (`constrain(x, ('batch',
'length', 'act_embed'))`). Outside a training mesh this is the identity; the
trainer installs a mesh and a rule table with `activation_sharding(...)`, and
the same calls become `with_sharding_constraint`s. Parameters carry their
logical axes as `logical_axes` metadata instead (see `param`).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

# (mesh, {logical axis: mesh axis | tuple of mesh axes | None}) or None.
_ACTIVE = contextvars.ContextVar("ablax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(
  mesh: jax.sharding.Mesh, rules: Mapping[str, str | Sequence[str] | None]
) -> Iterator[None]:
  """Makes `constrain` apply `rules` on `mesh` while tracing inside the block."""
  token = _ACTIVE.set((mesh, dict(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[jax.sharding.Mesh, dict] | None:
  """The (mesh, rules) installed by `activation_sharding`, or None outside one.

  For code that must place work on devices itself (a Pallas kernel in shard_map).
  """
  return _ACTIVE.get()


def logical_to_spec(
  axes: Sequence[str | None], rules: Mapping[str, str | Sequence[str] | None]
) -> PartitionSpec:
  """PartitionSpec for logical `axes`; an axis without a rule is replicated."""
  used: set[str] = set()
  spec = []
  for axis in axes:
    target = rules.get(axis) if axis is not None else None
    names = (target,) if isinstance(target, str) else tuple(target or ())
    # A mesh axis may shard only one dimension of an array.
    names = tuple(n for n in names if n not in used)
    used.update(names)
    spec.append(names[0] if len(names) == 1 else (names or None))
  return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))


def param(init, key: jax.Array, shape: Sequence[int], dtype, axes: Sequence[str]) -> nnx.Param:
  """An nnx.Param initialized by `init`, tagged with its logical axis names."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match shape {shape}")
  return nnx.Param(init(key, tuple(shape), dtype), logical_axes=tuple(axes))
