"""Key/value cache for incremental decoding.

Decoding one token at a time recomputes nothing: each layer keeps the keys
(after RoPE) and values of every earlier token in a buffer of `max_len` slots,
and a forward pass with a cache writes its tokens at slots index..index+T-1 and
attends over the buffer.

Local (sliding-window) layers keep a full-length buffer too and mask it to the
window by the same rule as the uncached forward pass (core/model/masking.py), so cached decoding equals
full recomputation exactly; a ring buffer of `window` slots would save memory on
long contexts at the price of a second masking scheme.

Rows of a batch may have prompts of different lengths: prompts are left-padded
to a common length, padding slots are marked invalid (`valid`), and each row's
positions start at 0 at its first real token. Within a row real tokens occupy
consecutive slots, so slot distance equals position distance and the window
mask is the same as in an unpadded row.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from core.model.config import ModelConfig


class KVCache(NamedTuple):
  """Cached keys and values of every layer.

  Attributes:
    k, v: one (B, S, K, H) array per layer, in the compute dtype.
    valid: (B, S) bool, True where a slot holds a real token (not empty, not padding).
    index: int32 scalar, the number of slots written; the next tokens go there.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array

  @property
  def max_len(self) -> int:
    return self.valid.shape[1]


def init_cache(config: ModelConfig, batch: int, max_len: int) -> KVCache:
  """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated)."""
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  dtype = jnp.dtype(config.dtype)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(
    k=zeros,
    v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
    valid=jnp.zeros((batch, max_len), bool),
    index=jnp.zeros((), jnp.int32),
  )
