"""The decoder-only Transformer: blocks of attention + feed-forward with configurable norms."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from core.model.attention import Attention
from core.model.cache import KVCache
from core.model.masking import MaskSpec, decode_spec, training_spec
from core.model.config import ModelConfig
from core.model.embed import Embedder
from core.model.mlp import MLP
from core.model.ops import softcap
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
    pre_post = self.placement == "pre_post"
    self.attn_norm = make_norm(config, rngs=rngs)
    self.attn = Attention(config, kind, rngs=rngs)
    # The output norms exist only for 'pre_post'; None otherwise, so no parameter is made.
    self.attn_out_norm = make_norm(config, rngs=rngs) if pre_post else None
    self.mlp_norm = make_norm(config, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)
    self.mlp_out_norm = make_norm(config, rngs=rngs) if pre_post else None

  def _sublayer(self, x, y, norm, out_norm):
    """Adds the sublayer output y = f(input) to the residual stream x, by the placement."""
    if self.placement == "pre":
      return x + y
    if self.placement == "post":
      return norm(x + y)
    return x + out_norm(y)

  def _input(self, x, norm):
    return x if self.placement == "post" else norm(x)

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    spec: MaskSpec,
    cache: tuple[jax.Array, jax.Array] | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """(B, T, D) -> ((B, T, D), kv): kv is the updated (k, v) cache, None without one."""
    y, kv = self.attn(self._input(x, self.attn_norm), positions, spec, cache)
    x = self._sublayer(x, y, self.attn_norm, self.attn_out_norm)
    y = self.mlp(self._input(x, self.mlp_norm))
    x = self._sublayer(x, y, self.mlp_norm, self.mlp_out_norm)
    return constrain(x, ("batch", "length", "act_embed")), kv


class Transformer(nnx.Module):
  """Token ids (B, T) -> float32 logits (B, T, V).

  `positions` default to 0..T-1; with packed rows pass per-document positions
  and `segment_ids` (0 = padding), and attention never crosses documents.

  Incremental decoding: pass a `cache` (core.model.cache.init_cache) and get
  (logits, updated cache); the T tokens are written at slots cache.index..
  and attend to everything cached before them. With a cache, `segment_ids`
  only mark padding (0, e.g. left padding of short prompts) and positions
  default to index..index+T-1.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embedder = Embedder(config, rngs=rngs)
    blocks = [Block(config, kind, rngs=rngs) for kind in config.layer_kinds]
    # Unrolled: blocks[i] is layer i. Scanned: blocks[p] is position p of the period,
    # every weight with a leading 'layers' axis over the repeats (layer r * P + p).
    self.blocks = nnx.List(_stack_periods(config, blocks) if config.scan_layers else blocks)
    self.final_norm = make_norm(config, rngs=rngs)

  def __call__(
    self,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: KVCache | None = None,
  ):
    """Logits (B, T, V); with a `cache`, (logits, updated cache)."""
    x, new_cache = self.forward(tokens, positions, segment_ids, cache)
    logits = self.head(x)
    return logits if cache is None else (logits, new_cache)

  def hidden(
    self,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """(B, T, D) final hidden states, after the final norm: what `head` maps to logits.

    A vocabulary-tiled loss (core.train.loss.chunked_cross_entropy) starts here,
    with embedder.output_rows(), so the whole (B, T, V) logits never exist.
    """
    return self.forward(tokens, positions, segment_ids)[0]

  def forward(
    self,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: KVCache | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """The one forward path: (final hidden states (B, T, D), updated cache or None).

    Training and scoring (no cache) build the mask from segment ids and run
    the blocks rematerialized by config.remat, scanned over the attention
    pattern's period when config.scan_layers. Decoding (a cache) writes the T
    tokens at slots cache.index.. and sees what the cache's slots hold; it runs
    layer by layer, without remat.
    """
    c = self.config
    batch, length = tokens.shape
    if c.position_embedding == "learned" and length > c.max_seq_len:
      raise ValueError(
        f"sequence length {length} exceeds max_seq_len {c.max_seq_len} "
        "of the learned position table"
      )
    start = 0 if cache is None else cache.index
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
    x = self.embedder.encode(tokens, positions)
    x = constrain(x, ("batch", "length", "act_embed"))
    if cache is None:
      return self.final_norm(self._train_blocks(x, positions, segment_ids)), None
    real = jnp.ones((batch, length), bool) if segment_ids is None else segment_ids != 0
    valid = jax.lax.dynamic_update_slice(cache.valid, real, (0, cache.index))
    spec = decode_spec(valid, cache.index, length)
    keys, values = [], []
    for block, k, v in zip(self.layers(), cache.k, cache.v):
      x, (k, v) = block(x, positions, spec, (k, v))
      keys.append(k)
      values.append(v)
    new_cache = KVCache(
      k=tuple(keys),
      v=tuple(values),
      valid=valid,
      index=cache.index + jnp.asarray(length, jnp.int32),
    )
    return self.final_norm(x), new_cache

  def _train_blocks(self, x, positions, segment_ids):
    call = _block_call(self.config.remat)
    if self.config.scan_layers:
      # One period is traced and compiled once; the carry is the residual stream.
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def period(x, blocks):
        for block in blocks:
          x = call(block, x, positions, segment_ids)
        return x

      return period(x, self.blocks)
    for block in self.blocks:
      x = call(block, x, positions, segment_ids)
    return x

  def head(self, x: jax.Array) -> jax.Array:
    """Final hidden states (B, T, D) -> float32 logits (B, T, V), soft-capped."""
    logits = self.embedder.decode(x)
    logits = softcap(logits, self.config.final_softcap)
    return constrain(logits, ("batch", "length", "act_vocab"))

  def layers(self) -> list[Block]:
    """Layer i's Block for every i, whatever the layout (scanned layers are sliced out)."""
    if not self.config.scan_layers:
      return list(self.blocks)
    period, repeats = self.config.layer_period
    graphdef, state = nnx.split(self.blocks)
    out = []
    for r in range(repeats):
      sliced = nnx.merge(graphdef, jax.tree.map(lambda a, r=r: a[r], state))
      out.extend(sliced[p] for p in range(len(period)))
    return out


def _call_block(block: Block, x, positions, segment_ids):
  # The spec is rebuilt inside: its offset and length must stay Python ints, not remat inputs.
  return block(x, positions, training_spec(x.shape[1], segment_ids))[0]


@functools.cache
def _block_call(remat: str):
  """`_call_block`, rematerialized by the config's policy; built once per policy."""
  if remat == "none":
    return _call_block
  return nnx.remat(_call_block, policy=_REMAT_POLICIES[remat])


def _stack_periods(config: ModelConfig, blocks: list[Block]) -> list[Block]:
  """The layers as P blocks whose weights are stacked over the R repeats of the period.

  Built from the unrolled layers, so a scanned model starts from the same weights
  as the unrolled one with the same seed. The stacked axis is logical axis
  'layers' (never sharded by the default rules).
  """
  period, repeats = config.layer_period
  size = len(period)
  is_var = lambda x: isinstance(x, nnx.Variable)

  def stack(*variables: nnx.Variable) -> nnx.Variable:
    out = variables[0].replace(jnp.stack([v.get_value() for v in variables]))
    axes = variables[0].get_metadata().get("logical_axes")
    if axes is not None:
      out.set_metadata(logical_axes=("layers",) + tuple(axes))
    return out

  stacked = []
  for p in range(size):
    splits = [nnx.split(blocks[r * size + p]) for r in range(repeats)]
    states = [state for _, state in splits]
    stacked.append(nnx.merge(splits[0][0], jax.tree.map(stack, *states, is_leaf=is_var)))
  return stacked
