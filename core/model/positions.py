"""Position information: rotary embeddings (RoPE) and learned absolute embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotates x (B, T, N or K, H) by its positions (B, T).

  Uses the half-split layout (dimension i pairs with i + H/2), the layout of the
  Gemma reference and of Hugging Face checkpoints, so imported weights need no
  permutation. Angles are computed in float32.
  """
  head_dim = x.shape[-1]
  half = head_dim // 2
  inv_freq = 1.0 / (base ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
