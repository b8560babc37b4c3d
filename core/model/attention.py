"""Attention: masks, one attention function with pluggable implementations, the module.

Multi-head, grouped-query and multi-query attention are one code path: queries
are grouped as (K kv heads) x (G = N / K query heads each). Masks (causal,
sliding window, packed segments) are built once per forward pass and shared by
every layer of the same kind.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from core.model.positions import apply_rope
from core.model.sharding import constrain, param


class Masks(NamedTuple):
  """Boolean (B, 1, T, S) masks, True where a query may attend to a key."""
  global_: jax.Array
  local: jax.Array | None


def make_masks(batch: int, length: int, segment_ids: jax.Array | None,
               window: int | None, need_local: bool) -> Masks:
  """Causal masks over sequence indices, restricted to same-segment keys.

  Causality uses the index in the row, not the per-segment position, so packed
  documents never see each other (the segment test) nor the future (the index
  test). A local layer additionally sees only the `window` most recent keys,
  itself included.
  """
  idx = jnp.arange(length)
  causal = idx[:, None] >= idx[None, :]  # (T, S)
  mask = jnp.broadcast_to(causal, (batch, 1, length, length))
  if segment_ids is not None:
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = mask & same[:, None, :, :]
  local = None
  if need_local:
    in_window = (idx[:, None] - idx[None, :]) < window
    local = mask & in_window[None, None]
  return Masks(global_=mask, local=local)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap): bounds logits smoothly (Gemma 2)."""
  if cap is None:
    return x
  return cap * jnp.tanh(x / cap)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
           logit_softcap: float | None, impl: str, window: int | None = None,
           causal_only: bool = False) -> jax.Array:
  """Attention of q (B, T, N, H) over k, v (B, S, K, H); returns (B, T, N, H).

  impl='einsum' is plain XLA and supports every option. impl='dot_product_attention'
  calls jax.nn.dot_product_attention, which picks cuDNN flash attention on GPU;
  when `causal_only` (no packed segments) it passes is_causal and the window
  instead of a dense mask so that cuDNN can skip masked blocks.
  """
  if impl == "dot_product_attention":
    if logit_softcap is not None:
      raise ValueError("attention soft-capping needs attention_impl='einsum'")
    if causal_only:
      return jax.nn.dot_product_attention(
          q, k, v, scale=scale, is_causal=True,
          local_window_size=None if window is None else (window - 1, 0))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)

  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  logits = softcap(logits, logit_softcap)
  # mask (B, 1, T, S) -> (B, 1, 1, T, S) to broadcast over kv heads and groups.
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, n, h)


class Attention(nnx.Module):
  """Self-attention with N query heads and K key/value heads."""

  def __init__(self, config, kind: str, *, rngs: nnx.Rngs):
    c = config
    dtype = jnp.dtype(c.param_dtype)
    dense = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                              in_axis=0, out_axis=(1, 2))
    out_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                 in_axis=(0, 1), out_axis=2)
    self.q = param(dense, rngs.params(), (c.embed_dim, c.num_heads, c.head_dim), dtype,
                   ("embed", "heads", "head_dim"))
    self.k = param(dense, rngs.params(), (c.embed_dim, c.num_kv_heads, c.head_dim), dtype,
                   ("embed", "kv_heads", "head_dim"))
    self.v = param(dense, rngs.params(), (c.embed_dim, c.num_kv_heads, c.head_dim), dtype,
                   ("embed", "kv_heads", "head_dim"))
    self.o = param(out_init, rngs.params(), (c.num_heads, c.head_dim, c.embed_dim), dtype,
                   ("heads", "head_dim", "embed"))
    self.kind = kind
    self.window = c.window if kind == "local" else None
    self.scale = c.query_scale
    self.softcap = c.attn_softcap
    self.impl = c.attention_impl
    self.rope_base = c.rope_base if c.positions == "rope" else None
    self.compute_dtype = jnp.dtype(c.dtype)

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               causal_only: bool = False, cache: tuple[jax.Array, jax.Array] | None = None,
               cache_index: jax.Array | None = None):
    """Attention of x (B, T, D); returns (B, T, D).

    With `cache` = (k, v) buffers (B, S, K, H) (see core/model/cache.py), the
    new keys and values are written at slots cache_index.., the queries attend
    over the whole buffer under `mask` (B, 1, T, S), and the result is
    (output, (k, v)) with the updated buffers.
    """
    cd = self.compute_dtype
    q = jnp.einsum("btd,dnh->btnh", x, self.q[...].astype(cd))
    k = jnp.einsum("bsd,dkh->bskh", x, self.k[...].astype(cd))
    v = jnp.einsum("bsd,dkh->bskh", x, self.v[...].astype(cd))
    q = constrain(q, ("batch", "length", "act_heads", "head_dim"))
    k = constrain(k, ("batch", "length", "act_kv_heads", "head_dim"))
    if self.rope_base is not None:
      q = apply_rope(q, positions, self.rope_base)
      k = apply_rope(k, positions, self.rope_base)
    if cache is not None:
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
      v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
      causal_only = False  # the mask, not the index in the row, says what is visible
    out = attend(q, k, v, mask, scale=self.scale, logit_softcap=self.softcap, impl=self.impl,
                 window=self.window, causal_only=causal_only)
    out = constrain(out, ("batch", "length", "act_heads", "head_dim"))
    out = jnp.einsum("btnh,nhd->btd", out, self.o[...].astype(cd))
    return out if cache is None else (out, (k, v))
