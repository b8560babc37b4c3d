"""Flash-style blockwise attention in pure JAX: memory linear in sequence length.

The forward pass loops over query blocks and, inside, over the key blocks that
block can see, keeping a running max and sum of the softmax (the "online
softmax" of FlashAttention), so no (T, S) array of scores ever exists. The
backward pass is a custom VJP that recomputes the probabilities block by block
from the saved log-sum-exp, as FlashAttention does, so it too holds only
O(T * block) scores. `jax.checkpoint` around the dense path would not do this:
it recomputes, but the recomputed (T, S) scores still live at once.

Key blocks that no query of a block can see are not visited at all: the inner
loops run over a block range computed from causality and the window, so a
local layer costs O(T * window) time, not O(T^2).

Layout inside: queries grouped as (B, K, G, T, H), keys and values (B, K, S, H),
so grouped-query and multi-query attention never repeat K/V in memory. Einsum
letters are those of core/model/attention.py; inside a tile, T and S count the
tile's query and key rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from core.model.masking import visible
from core.model.ops import softcap

# A finite "minus infinity": exp(NEG - m) underflows to 0 without inf - inf = nan.
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


class _Static(NamedTuple):
  scale: float
  attn_softcap: float | None
  window: int | None
  block_q: int
  block_k: int


def blockwise_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float,
  attn_softcap: float | None = None,
  window: int | None = None,
  q_segment_ids: jax.Array | None = None,
  kv_segment_ids: jax.Array | None = None,
  q_offset: int | jax.Array = 0,
  block_q: int = 512,
  block_k: int = 512,
) -> jax.Array:
  """Causal attention of q (B, T, N, H) over k, v (B, S, K, H); returns (B, T, N, H).

  Query row t sits at index q_offset + t of the key sequence (0 in training; the
  cache slot when decoding). It sees key s when s <= that index, when the index
  minus s is below `window` (local layers), and when the segment ids are equal
  (packed documents; padding keys carry their own id). Any T and S: they are
  padded up to whole blocks, and padded keys are never visible to real queries
  because they lie in every real query's future.
  """
  if block_q <= 0 or block_k <= 0:
    raise ValueError(f"attention block sizes must be positive, got {block_q}, {block_k}")
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  bq, bk = min(block_q, t), min(block_k, s)
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  # Grouped layout, once per call; the blocks then slice contiguous rows.
  qt = jnp.pad(
    q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4),
    ((0, 0),) * 3 + ((0, tp - t), (0, 0)),
  )
  kt = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
  vt = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
  if q_segment_ids is None:
    q_seg = kv_seg = None
  else:
    q_seg = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t)))
    kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, sp - s)), constant_values=-1)
  offset = jnp.asarray(q_offset, jnp.int32)
  out = _flash(
    _Static(float(scale), attn_softcap, window, bq, bk), qt, kt, vt, q_seg, kv_seg, offset
  )
  return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def key_block_range(first_row, last_row, static: _Static, num_key_blocks: int):
  """[lo, hi) of the key blocks that query indices first_row..last_row can see."""
  hi = jnp.minimum(num_key_blocks, last_row // static.block_k + 1)
  if static.window is None:
    return jnp.zeros_like(hi), hi
  return jnp.maximum(0, (first_row - static.window + 1) // static.block_k), hi


def query_block_range(first_key, last_key, offset, static: _Static, num_query_blocks: int):
  """[lo, hi) of the query blocks that can see key indices first_key..last_key."""
  lo = jnp.maximum(0, (first_key - offset) // static.block_q)
  if static.window is None:
    return lo, jnp.full_like(lo, num_query_blocks)
  last_row = last_key + static.window - 1 - offset
  return lo, jnp.clip(last_row // static.block_q + 1, 0, num_query_blocks)


def _scores(static: _Static, qi, kj, rows, cols, q_seg_i, kv_seg_j):
  """Capped scores (B, K, G, bq, bk) in float32 and the visibility mask."""
  raw = jnp.einsum("bkgth,bksh->bkgts", qi, kj, preferred_element_type=jnp.float32) * static.scale
  capped = softcap(raw, static.attn_softcap)
  mask = visible(rows, cols, q_seg_i, kv_seg_j, static.window)[:, None, None]
  return capped, mask


def _slice(x, start, size, axis):
  return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _forward(static: _Static, qt, kt, vt, q_seg, kv_seg, offset):
  """(out (B, K, G, Tp, H), lse (B, K, G, Tp) float32)."""
  bq, bk = static.block_q, static.block_k
  nq, nk = qt.shape[3] // bq, kt.shape[2] // bk
  stat_shape = qt.shape[:3] + (bq,)

  def query_block(i):
    qi = _slice(qt, i * bq, bq, 3)
    q_seg_i = _slice(q_seg, i * bq, bq, 1)
    rows = offset + i * bq + jnp.arange(bq)
    lo, hi = key_block_range(offset + i * bq, offset + i * bq + bq - 1, static, nk)

    def key_block(j, carry):
      m, l, acc = carry
      kj, vj = _slice(kt, j * bk, bk, 2), _slice(vt, j * bk, bk, 2)
      s, mask = _scores(
        static, qi, kj, rows, j * bk + jnp.arange(bk), q_seg_i, _slice(kv_seg, j * bk, bk, 1)
      )
      m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, _NEG), axis=-1))
      # where(), not just the _NEG fill: in a row with nothing visible yet m_new
      # is _NEG itself and exp(_NEG - m_new) would be 1.
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      acc = acc * corr[..., None] + jnp.einsum(
        "bkgts,bksh->bkgth", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32
      )
      return m_new, l * corr + jnp.sum(p, axis=-1), acc

    init = (
      jnp.full(stat_shape, _NEG, jnp.float32),
      jnp.zeros(stat_shape, jnp.float32),
      jnp.zeros(qi.shape, jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(lo, hi, key_block, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return out.astype(qt.dtype), lse

  out, lse = jax.lax.map(query_block, jnp.arange(nq))  # (nq, B, K, G, bq, ...)
  out = jnp.moveaxis(out, 0, 3).reshape(qt.shape)
  lse = jnp.moveaxis(lse, 0, 3).reshape(qt.shape[:4])
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, qt, kt, vt, q_seg, kv_seg, offset):
  return _forward(static, qt, kt, vt, q_seg, kv_seg, offset)[0]


def _flash_fwd(static, qt, kt, vt, q_seg, kv_seg, offset):
  out, lse = _forward(static, qt, kt, vt, q_seg, kv_seg, offset)
  return out, (qt, kt, vt, q_seg, kv_seg, offset, out, lse)


def _flash_bwd(static, residuals, dout):
  """FlashAttention's backward: per key block, recompute p over the query blocks that see it."""
  qt, kt, vt, q_seg, kv_seg, offset, out, lse = residuals
  bq, bk = static.block_q, static.block_k
  nq, nk = qt.shape[3] // bq, kt.shape[2] // bk
  # D_i = sum_h dO * O, the softmax's correction term per query row.
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

  def key_block(dq, j):
    kj, vj = _slice(kt, j * bk, bk, 2), _slice(vt, j * bk, bk, 2)
    cols = j * bk + jnp.arange(bk)
    kv_seg_j = _slice(kv_seg, j * bk, bk, 1)
    lo, hi = query_block_range(j * bk, j * bk + bk - 1, offset, static, nq)

    def query_block(i, carry):
      dq, dk, dv = carry
      qi, doi = _slice(qt, i * bq, bq, 3), _slice(dout, i * bq, bq, 3)
      lse_i, delta_i = _slice(lse, i * bq, bq, 3), _slice(delta, i * bq, bq, 3)
      rows = offset + i * bq + jnp.arange(bq)
      s, mask = _scores(static, qi, kj, rows, cols, _slice(q_seg, i * bq, bq, 1), kv_seg_j)
      p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
      dv = dv + jnp.einsum(
        "bkgts,bkgth->bksh", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32
      )
      dp = jnp.einsum("bkgth,bksh->bkgts", doi, vj, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i[..., None])
      if static.attn_softcap is not None:  # d/dx c*tanh(x/c) = 1 - tanh^2 = 1 - (capped/c)^2
        ds = ds * (1.0 - jnp.square(s / static.attn_softcap))
      ds = (ds * static.scale).astype(qi.dtype)
      dq_i = jnp.einsum("bkgts,bksh->bkgth", ds, kj, preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_slice_in_dim(dq, _slice(dq, i * bq, bq, 3) + dq_i, i * bq, 3)
      dk = dk + jnp.einsum("bkgts,bkgth->bksh", ds, qi, preferred_element_type=jnp.float32)
      return dq, dk, dv

    zeros = jnp.zeros(kj.shape, jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(lo, hi, query_block, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qt.shape, jnp.float32), jnp.arange(nk))
  dk = jnp.moveaxis(dk, 0, 2).reshape(kt.shape)
  dv = jnp.moveaxis(dv, 0, 2).reshape(vt.shape)
  return (dq.astype(qt.dtype), dk.astype(kt.dtype), dv.astype(vt.dtype), None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
