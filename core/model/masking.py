"""Which keys a query may see: one rule for every attention implementation.

Training (packed rows), cached decoding and every backend follow the same rule,
written once here: a query at index i of the key sequence sees key j when

- j <= i (causality by index in the row, not by per-document position, so packed
  documents never see the future);
- i - j < window, on local layers (itself and the window - 1 keys before it);
- the two carry the same segment id (packed documents never see each other;
  padding has an id of its own, and cached decoding marks empty slots apart).

The dense einsum reference evaluates it over the whole (T, S) grid; the
blockwise implementation evaluates it one (block, block) tile at a time, and
never builds the whole grid.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MaskSpec(NamedTuple):
  """What one forward pass knows about visibility, shared by every layer.

  Attributes:
    q_segment_ids: (B, T) int ids of the queries' documents, or None (one document).
    kv_segment_ids: (B, S) ids of the keys' documents; None with q_segment_ids.
    q_offset: index of the first query in the key sequence: 0 in training, the
      cache slot when decoding (a traced int32 scalar there).
    key_length: S.
  """

  q_segment_ids: jax.Array | None
  kv_segment_ids: jax.Array | None
  q_offset: int | jax.Array
  key_length: int

  @property
  def causal_only(self) -> bool:
    """True when causality (and the window) alone decide: no segments, keys == queries."""
    return self.q_segment_ids is None and isinstance(self.q_offset, int) and self.q_offset == 0


def training_spec(length: int, segment_ids: jax.Array | None) -> MaskSpec:
  """The spec of an uncached forward pass over `length` tokens (segment 0 = padding)."""
  return MaskSpec(segment_ids, segment_ids, 0, length)


def decode_spec(valid: jax.Array, index: jax.Array, length: int) -> MaskSpec:
  """The spec of `length` new tokens at cache slots index.. over a cache whose
  real tokens are `valid` (B, S): empty and padding slots are a segment apart."""
  batch = valid.shape[0]
  return MaskSpec(
    jnp.ones((batch, length), jnp.int32), valid.astype(jnp.int32), index, valid.shape[1]
  )


def visible(
  rows: jax.Array,
  cols: jax.Array,
  q_segment_ids: jax.Array | None,
  kv_segment_ids: jax.Array | None,
  window: int | None,
) -> jax.Array:
  """Boolean (B or 1, T, S): query index rows[t] may see key index cols[s]."""
  mask = cols[None, :] <= rows[:, None]
  if window is not None:
    mask = mask & ((rows[:, None] - cols[None, :]) < window)
  mask = mask[None]
  if q_segment_ids is not None:
    mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  return mask


def dense_mask(spec: MaskSpec, query_length: int, window: int | None) -> jax.Array:
  """The whole (B or 1, T, S) mask, for the einsum reference and explicit-mask backends."""
  rows = spec.q_offset + jnp.arange(query_length)
  return visible(rows, jnp.arange(spec.key_length), spec.q_segment_ids, spec.kv_segment_ids, window)
