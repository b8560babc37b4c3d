"""The decoder-only Transformer: blocks of attention + feed-forward with configurable norms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from core.model.attention import Attention, make_masks, softcap
from core.model.config import ModelConfig
from core.model.embed import Embedder
from core.model.mlp import MLP
from core.model.norms import make_norm
from core.model.sharding import constrain

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
}


class Block(nnx.Module):
  """One layer. Norm placement:

  - 'pre'      x + f(norm(x))                 (LLaMA, Gemma 1)
  - 'post'     norm(x + f(x))                 (the original Transformer)
  - 'pre_post' x + norm_out(f(norm_in(x)))    (Gemma 2)
  """

  def __init__(self, config: ModelConfig, kind: str, *, rngs: nnx.Rngs):
    self.placement = config.norm_placement
    self.kind = kind
    self.attn_norm = make_norm(config, rngs=rngs)
    self.attn = Attention(config, kind, rngs=rngs)
    if self.placement == "pre_post":
      self.attn_out_norm = make_norm(config, rngs=rngs)
    self.mlp_norm = make_norm(config, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)
    if self.placement == "pre_post":
      self.mlp_out_norm = make_norm(config, rngs=rngs)

  def _sublayer(self, x, f, norm, out_norm):
    if self.placement == "pre":
      return x + f(norm(x))
    if self.placement == "post":
      return norm(x + f(x))
    return x + out_norm(f(norm(x)))

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               causal_only: bool = False) -> jax.Array:
    x = self._sublayer(x, lambda h: self.attn(h, positions, mask, causal_only),
                       self.attn_norm, getattr(self, "attn_out_norm", None))
    x = self._sublayer(x, self.mlp, self.mlp_norm, getattr(self, "mlp_out_norm", None))
    return constrain(x, ("batch", "length", "act_embed"))


class Transformer(nnx.Module):
  """Token ids (B, T) -> float32 logits (B, T, V).

  `positions` default to 0..T-1; with packed rows pass per-document positions
  and `segment_ids` (0 = padding), and attention never crosses documents.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embedder = Embedder(config, rngs=rngs)
    self.blocks = nnx.List([Block(config, kind, rngs=rngs) for kind in config.layer_kinds])
    self.final_norm = make_norm(config, rngs=rngs)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    c = self.config
    batch, length = tokens.shape
    if c.positions == "learned" and length > c.max_seq_len:
      raise ValueError(f"sequence length {length} exceeds max_seq_len {c.max_seq_len} "
                       "of the learned position table")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    kinds = c.layer_kinds
    masks = make_masks(batch, length, segment_ids, c.window, need_local="local" in kinds)
    causal_only = segment_ids is None

    x = self.embedder.encode(tokens, positions)
    x = constrain(x, ("batch", "length", "act_embed"))
    for block in self.blocks:
      mask = masks.local if block.kind == "local" else masks.global_
      if c.remat == "none":
        x = block(x, positions, mask, causal_only)
      else:
        x = nnx.remat(_call_block, policy=_REMAT_POLICIES[c.remat], static_argnums=(4,))(
            block, x, positions, mask, causal_only)
    x = self.final_norm(x)
    logits = self.embedder.decode(x)
    logits = softcap(logits, c.final_softcap)
    return constrain(logits, ("batch", "length", "act_vocab"))


def _call_block(block: Block, x, positions, mask, causal_only):
  return block(x, positions, mask, causal_only)
