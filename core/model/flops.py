"""Parameter counts and FLOPs per token, from a config, without allocating weights.

Counts come from the model itself (`nnx.eval_shape` builds abstract arrays),
so they cannot drift from the code. FLOPs follow the PaLM appendix convention
(6 x matmul parameters + attention, causal masking not discounted) with a local
layer's context capped at its window.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from core.model.config import ModelConfig

# Parameters whose size scales with the vocabulary or the context table; the
# papers' "embedding parameters".
_EMBEDDING_LEAVES = ("embedding", "unembed", "position_embedding")


class _ConstantKeys:
  """Stands in for nnx.Rngs when only shapes matter.

  Drawing from a real nnx.Rngs under eval_shape updates its traced counter once
  per parameter, and that bookkeeping grows quadratically with the model
  (minutes for 65B); a constant key gives the same shapes in a second.
  """

  def params(self) -> jax.Array:
    return jax.random.key(0)


def abstract_model(config: ModelConfig):
  """The model with jax.ShapeDtypeStruct leaves: shapes only, no memory."""
  from core.model.transformer import Transformer  # local: flops is imported by light code

  return nnx.eval_shape(lambda: Transformer(config, rngs=_ConstantKeys()))


def param_counts(config: ModelConfig) -> dict[str, int]:
  """{'embedding': E, 'non_embedding': N, 'total': E + N}."""
  state = nnx.state(abstract_model(config), nnx.Param)
  embedding = non_embedding = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    size = math.prod(leaf.shape)
    names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    if any(n in _EMBEDDING_LEAVES for n in names):
      embedding += size
    else:
      non_embedding += size
  return {
    "embedding": embedding,
    "non_embedding": non_embedding,
    "total": embedding + non_embedding,
  }


def matmul_params(config: ModelConfig) -> int:
  """Weights used in a matmul per token: all layers plus the output projection."""
  c = config
  attn = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = c.embed_dim * c.mlp_dim * (3 if c.gated else 2)
  return c.num_layers * (attn + mlp) + c.embed_dim * c.vocab_size


def flops_per_token(config: ModelConfig, seq_len: int, training: bool = True) -> float:
  """Model FLOPs per token: 2 per weight multiply-add forward, x3 for training."""
  c = config
  attention = 0
  for kind in c.layer_kinds:
    context = min(seq_len, c.window) if kind == "local" else seq_len
    attention += 4 * c.num_heads * c.head_dim * context  # QK^T and PV
  forward = 2 * matmul_params(c) + attention
  return float(3 * forward if training else forward)
