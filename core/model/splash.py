"""TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention) behind `attend`.

Splash takes unbatched (heads, T, H) queries; grouped-query attention maps onto
its multi-query kernel once per kv head (G query heads share one K/V), so K/V
are never repeated. Its masks are lazy block masks (causal, local), so local
layers skip out-of-window blocks on the chip as blockwise does in JAX. Packed
documents go in as SegmentIds.

A Pallas kernel is opaque to XLA's SPMD partitioner, so under a training mesh
the kernel runs inside shard_map over the batch (and kv heads, when they divide
the tensor axis), each device on its own rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from core.model import sharding
from core.model.masking import MaskSpec


@functools.lru_cache(maxsize=None)  # one kernel (and block-mask analysis) per shape, not per layer
def _kernel(
  length: int,
  heads_per_kv: int,
  window: int | None,
  attn_softcap: float | None,
  block_q: int,
  block_k: int,
  interpret: bool,
):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
    splash_attention_kernel as kernel_lib,
    splash_attention_mask as mask_lib,
  )

  shape = (length, length)
  base = (
    mask_lib.CausalMask(shape)
    if window is None
    else mask_lib.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  )
  bq, bk = min(block_q, length), min(block_k, length)
  blocks = kernel_lib.BlockSizes(
    block_q=bq,
    block_kv=bk,
    block_kv_compute=bk,
    block_q_dkv=bq,
    block_kv_dkv=bk,
    block_kv_dkv_compute=bk,
    block_q_dq=bq,
    block_kv_dq=bk,
  )
  return kernel_lib.make_splash_mqa_single_device(
    mask_lib.MultiHeadMask([base] * heads_per_kv),
    block_sizes=blocks,
    attn_logits_soft_cap=attn_softcap,
    interpret=interpret,
  ), kernel_lib.SegmentIds


def splash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  spec: MaskSpec,
  *,
  scale: float,
  attn_softcap: float | None,
  window: int | None,
  block_q: int,
  block_k: int,
  interpret: bool = False,
) -> jax.Array:
  """q (B, T, N, H), k/v (B, T, K, H) -> (B, T, N, H); training shapes (no cache)."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  if t % min(block_q, t) or t % min(block_k, t):
    raise ValueError(
      f"splash attention needs the sequence length ({t}) to be a multiple of "
      f"the block sizes ({block_q}, {block_k}); use attention_impl='blockwise'"
    )
  kernel, segment_ids_cls = _kernel(
    t, n // kv_heads, window, attn_softcap, block_q, block_k, interpret
  )
  # Splash does not scale; scaling q first gives cap * tanh(scale * q.k / cap) as elsewhere.
  qg = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kv_heads, n // kv_heads, h)
  qg = qg.transpose(0, 2, 3, 1, 4)  # (B, K, G, T, H)
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, T, H)
  seg = spec.q_segment_ids

  def local(qg, kt, vt, seg):
    per_head = jax.vmap(
      lambda qh, kh, vh, s: kernel(qh, kh, vh, segment_ids=s), in_axes=(0, 0, 0, None)
    )
    if seg is None:
      return jax.vmap(lambda a, c, d: per_head(a, c, d, None))(qg, kt, vt)
    return jax.vmap(lambda a, c, d, s: per_head(a, c, d, segment_ids_cls(q=s, kv=s)))(
      qg, kt, vt, seg.astype(jnp.int32)
    )

  out = _under_mesh(local, qg, kt, vt, seg, kv_heads)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _under_mesh(fn, qg, kt, vt, seg, kv_heads: int):
  active = sharding.active()
  if active is None:
    return fn(qg, kt, vt, seg)
  mesh, rules = active
  batch = sharding.logical_to_spec(("batch",), rules)[0]
  heads = sharding.logical_to_spec(("act_kv_heads",), rules)[0]
  names = (heads,) if isinstance(heads, str) else tuple(heads or ())
  if kv_heads % math.prod(mesh.shape[name] for name in names):
    heads = None  # too few kv heads to split: each device keeps them all
  q_spec = PartitionSpec(batch, heads, None, None, None)
  kv_spec = PartitionSpec(batch, heads, None, None)
  seg_spec = None if seg is None else PartitionSpec(batch, None)
  mapped = jax.shard_map(
    fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False
  )
  return mapped(qg, kt, vt, seg)
