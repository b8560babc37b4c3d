"""Logical-axis rules: from the `logical_axes` of parameters and activations to mesh axes.

The model names what each dimension is (`('embed', 'mlp')`); a rule table says
which mesh axes shard it. Changing the parallelism layout is changing this
table (a gin binding), never model code. A dimension whose size does not
divide its mesh axes is replicated instead, with a logged note, so that tiny
models (4 kv heads) still run on a wide mesh.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from core.model.sharding import logical_to_spec

logger = logging.getLogger(__name__)

Rules = Mapping[str, "str | Sequence[str] | None"]

# ZeRO-3 layout: weights sharded over fsdp along their model dimension, heads and
# the MLP hidden dimension over tensor; the batch over every data-parallel axis.
DEFAULT_RULES: dict[str, Any] = {
  "vocab": "tensor",
  "embed": "fsdp",
  "heads": "tensor",
  "kv_heads": "tensor",
  "mlp": "tensor",
  "head_dim": None,
  "norm": None,
  "positions": None,
  "layers": None,  # the stacked axis of scanned layers: every device holds every layer's shard
  "batch": ("data", "fsdp"),
  "length": None,
  "act_embed": None,
  "act_heads": "tensor",
  "act_kv_heads": "tensor",
  "act_mlp": "tensor",
  "act_vocab": "tensor",
}


def merged_rules(overrides: Rules | None = None) -> dict[str, Any]:
  """DEFAULT_RULES with `overrides` applied (gin binds only the changes)."""
  rules = dict(DEFAULT_RULES)
  for axis, target in (overrides or {}).items():
    rules[axis] = tuple(target) if isinstance(target, list) else target
  return rules


def _axis_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[n] for n in names)


def fit_spec(
  spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, what: str = "array"
) -> PartitionSpec:
  """`spec` with every dimension that its mesh axes do not divide replicated."""
  fitted = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    size = _axis_size(mesh, entry)
    if size > 1 and dim % size:
      logger.info(
        "%s: dimension %d does not divide mesh axes %s (size %d); replicated",
        what,
        dim,
        entry,
        size,
      )
      entry = None
    fitted.append(entry)
  return PartitionSpec(*fitted)


def spec_for(
  axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules, what: str = "array"
) -> PartitionSpec:
  # A rule may name a mesh axis of size 1 or one the mesh lacks; drop the latter.
  known = {a: (_known(mesh, t)) for a, t in rules.items()}
  return fit_spec(logical_to_spec(axes, known), shape, mesh, what)


def _known(mesh: Mesh, target):
  if target is None:
    return None
  names = (target,) if isinstance(target, str) else tuple(target)
  names = tuple(n for n in names if n in mesh.shape)
  return names or None


def param_specs(state: nnx.State, mesh: Mesh, rules: Rules) -> dict:
  """A pure dict of PartitionSpecs, one per parameter, from its `logical_axes`."""
  variables = variables_by_path(state)

  def one(path, leaf):
    name = jax.tree_util.keystr(path)
    axes = variables[name].get_metadata().get("logical_axes")
    if axes is None:
      logger.info("%s has no logical_axes; replicated", name)
      return PartitionSpec()
    return spec_for(axes, leaf.shape, mesh, rules, what=name)

  return jax.tree_util.tree_map_with_path(one, nnx.to_pure_dict(state))


def variables_by_path(state: nnx.State) -> dict[str, nnx.Variable]:
  """{keystr(path): Variable}; the paths are those of `nnx.to_pure_dict(state)`."""
  leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return {jax.tree_util.keystr(p): v for p, v in leaves}


def named(mesh: Mesh, specs) -> Any:
  """NamedShardings for a tree of PartitionSpecs."""
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )


def batch_spec(mesh: Mesh, rules: Rules, shape: Sequence[int]) -> PartitionSpec:
  """Rows over the data-parallel axes, the sequence as the rules say."""
  return spec_for(("batch", "length"), shape, mesh, rules, what="batch")


def describe_specs(specs) -> dict[str, str]:
  """{'blocks.0.attn.q': "PartitionSpec('fsdp', 'tensor', None)", ...} for the run record."""
  flat = jax.tree_util.tree_flatten_with_path(
    specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )[0]
  return {".".join(str(getattr(k, "key", k)) for k in path): str(spec) for path, spec in flat}
