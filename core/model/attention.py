"""Attention: one attention function with pluggable implementations, the module.

Multi-head, grouped-query and multi-query attention are one code path: queries
are grouped as (K kv heads) x (G = N / K query heads each). What each query
may see (causal, sliding window, packed segments) is one MaskSpec per forward
pass; only the einsum reference and explicit-mask backends turn it into a dense
(T, S) mask.

Einsum letters, the same in every file of core/model:
  B batch    T query length    S key length     D model (embed) dim
  N query heads    K kv heads    G query heads per kv head (N / K)    H head dim
  F mlp dim    V vocab
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from core.model import attention_impls
from core.model.blockwise import blockwise_attention
from core.model.config import ModelConfig
from core.model.masking import MaskSpec, dense_mask
from core.model.ops import softcap
from core.model.positions import apply_rope
from core.model.sharding import constrain, param
from core.model.splash import splash_attention


def attend(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  spec: MaskSpec,
  *,
  scale: float,
  attn_softcap: float | None,
  impl: str,
  window: int | None = None,
  block_q: int = 512,
  block_k: int = 512,
) -> jax.Array:
  """Attention of q (B, T, N, H) over k, v (B, S, K, H); returns (B, T, N, H).

  `impl` is a concrete implementation (see core/model/attention_impls.py; the
  caller resolves 'auto'). Which keys each query sees is `spec` with `window`,
  by the one rule of core/model/masking.py.
  """
  if impl == "blockwise":
    return blockwise_attention(
      q,
      k,
      v,
      scale=scale,
      attn_softcap=attn_softcap,
      window=window,
      q_segment_ids=spec.q_segment_ids,
      kv_segment_ids=spec.kv_segment_ids,
      q_offset=spec.q_offset,
      block_q=block_q,
      block_k=block_k,
    )
  if impl == "splash":
    return splash_attention(
      q,
      k,
      v,
      spec,
      scale=scale,
      attn_softcap=attn_softcap,
      window=window,
      block_q=block_q,
      block_k=block_k,
    )
  if impl in ("cudnn", "dot_product_attention"):
    if attn_softcap is not None:
      raise ValueError(f"attention soft-capping needs another attention_impl than {impl!r}")
    backend = "cudnn" if impl == "cudnn" else None
    if spec.causal_only:
      # is_causal and the window instead of a mask, so cuDNN skips masked blocks.
      return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=True,
        implementation=backend,
        local_window_size=None if window is None else (window - 1, 0),
      )
    mask = dense_mask(spec, q.shape[1], window)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=backend)

  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  logits = softcap(logits, attn_softcap)
  # mask (B, T, S) -> (B, 1, 1, T, S) to broadcast over kv heads and groups.
  mask = dense_mask(spec, t, window)[:, None, None]
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, n, h)


class Attention(nnx.Module):
  """Self-attention with N query heads and K key/value heads."""

  def __init__(self, config: ModelConfig, kind: str, *, rngs: nnx.Rngs):
    c = config
    dtype = jnp.dtype(c.param_dtype)
    dense = nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)
    )
    out_init = nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
    )
    self.q = param(
      dense,
      rngs.params(),
      (c.embed_dim, c.num_heads, c.head_dim),
      dtype,
      ("embed", "heads", "head_dim"),
    )
    self.k = param(
      dense,
      rngs.params(),
      (c.embed_dim, c.num_kv_heads, c.head_dim),
      dtype,
      ("embed", "kv_heads", "head_dim"),
    )
    self.v = param(
      dense,
      rngs.params(),
      (c.embed_dim, c.num_kv_heads, c.head_dim),
      dtype,
      ("embed", "kv_heads", "head_dim"),
    )
    self.o = param(
      out_init,
      rngs.params(),
      (c.num_heads, c.head_dim, c.embed_dim),
      dtype,
      ("heads", "head_dim", "embed"),
    )
    self.kind = kind
    self.window = c.window if kind == "local" else None
    self.query_scale = c.query_scale
    self.attn_softcap = c.attn_softcap
    self.config = c
    self.rope_base = c.rope_base if c.position_embedding == "rope" else None
    self.compute_dtype = jnp.dtype(c.dtype)

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    spec: MaskSpec,
    cache: tuple[jax.Array, jax.Array] | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attention of x (B, T, D): (output (B, T, D), kv).

    kv is None without a cache. With `cache` = (k, v) buffers (B, S, K, H)
    (see core/model/cache.py), the new keys and values are written at slots
    spec.q_offset.., the queries attend over the whole buffer, and kv is the
    updated (k, v) buffers.
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
      start = (0, spec.q_offset, 0, 0)
      k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
      v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
    platform = attention_impls.current_platform()
    impl = attention_impls.choose(
      self.config,
      platform,
      spec.key_length,
      packed=spec.q_segment_ids is not None,
      decoding=cache is not None,
    )
    block_q, block_k = attention_impls.block_sizes(self.config, platform)
    out = attend(
      q,
      k,
      v,
      spec,
      scale=self.query_scale,
      attn_softcap=self.attn_softcap,
      impl=impl,
      window=self.window,
      block_q=block_q,
      block_k=block_k,
    )
    out = constrain(out, ("batch", "length", "act_heads", "head_dim"))
    out = jnp.einsum("btnh,nhd->btd", out, self.o[...].astype(cd))
    return out, (None if cache is None else (k, v))
