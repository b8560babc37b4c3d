"""Small numerical functions shared by the model and the loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap): bounds logits smoothly (Gemma 2); None = identity."""
  if cap is None:
    return x
  return cap * jnp.tanh(x / cap)
