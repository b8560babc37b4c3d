"""Token embedding, optional learned positions, and the output projection (tied or not)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from core.model.config import ModelConfig
from core.model.sharding import param


class Embedder(nnx.Module):
  """Maps ids to vectors and, at the top, vectors to vocabulary logits.

  With tied embeddings the output projection is the transpose of the input
  table (Gemma); otherwise it is a separate (D, V) matrix (LLaMA).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    dtype = jnp.dtype(c.param_dtype)
    # Unit-variance rows when inputs are scaled by sqrt(D) would make them huge;
    # rows of norm ~1 work for both the scaled and unscaled inputs.
    init = nnx.initializers.normal(stddev=c.embed_dim**-0.5)
    self.embedding = param(
      init, rngs.params(), (c.vocab_size, c.embed_dim), dtype, ("vocab", "embed")
    )
    if not c.tie_embeddings:
      self.unembed = param(
        init, rngs.params(), (c.embed_dim, c.vocab_size), dtype, ("embed", "vocab")
      )
    self.learned_positions = c.position_embedding == "learned"
    if self.learned_positions:
      self.position_embedding = param(
        nnx.initializers.normal(stddev=0.02),
        rngs.params(),
        (c.max_seq_len, c.embed_dim),
        dtype,
        ("positions", "embed"),
      )
    self.tie_embeddings = c.tie_embeddings
    self.scale_embeddings = c.scale_embeddings
    self.embed_dim = c.embed_dim
    self.compute_dtype = jnp.dtype(c.dtype)

  def encode(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.compute_dtype)
    if self.scale_embeddings:
      # Rounded to the compute dtype first, as the Gemma reference does.
      x = x * jnp.asarray(self.embed_dim**0.5, self.compute_dtype)
    if self.learned_positions:
      x = x + jnp.take(self.position_embedding[...], positions, axis=0).astype(self.compute_dtype)
    return x

  def output_rows(self) -> jax.Array:
    """(V, D) in the compute dtype: one row per vocabulary entry, for vocabulary-tiled losses."""
    if self.tie_embeddings:
      return self.embedding[...].astype(self.compute_dtype)
    return self.unembed[...].astype(self.compute_dtype).T

  def decode(self, x: jax.Array) -> jax.Array:
    if self.tie_embeddings:
      w = self.embedding[...].astype(self.compute_dtype)
      return jnp.einsum("btd,vd->btv", x, w, preferred_element_type=jnp.float32)
    w = self.unembed[...].astype(self.compute_dtype)
    return jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)
