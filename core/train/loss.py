"""Next-token cross-entropy: from whole logits, or vocabulary-tiled from the final hidden states.

Both return sums over loss_mask (token losses, log(Z)^2, token count), so
accumulated micro-batches and data-parallel shards add up to the loss of the
whole batch, divided once by its token count.

The tiled form exists for large vocabularies: Gemma's 256k-entry float32 logits
of one 8k-token sequence are 8 GiB, more than the rest of a layer's
activations. It scans the vocabulary in chunks of `chunk` rows, keeping a
running log-sum-exp and the target's logit, and the chunk body is
rematerialized, so forward and backward hold only (B, T, chunk) logits at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from core.model.ops import softcap

# A finite "minus infinity", so that exp(_NEG - m) is 0 and never nan.
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def cross_entropy(
  logits: jax.Array, targets: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sum of token losses, sum of log(Z)^2, number of tokens), all over loss_mask."""
  return loss_sums(*log_z_and_target(logits, targets), loss_mask)


def log_z_and_target(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(log Z, the target's logit) per token, in float32: a token's loss is their difference."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  return log_z, jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def chunked_cross_entropy(
  hidden: jax.Array,
  output_rows: jax.Array,
  targets: jax.Array,
  loss_mask: jax.Array,
  *,
  chunk: int,
  final_softcap: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """cross_entropy(softcap(hidden @ output_rows.T), ...) without the whole logits.

  hidden: (B, T, D) final hidden states (after the final norm); output_rows:
  (V, D), one row per vocabulary entry, in the compute dtype; chunk: rows per tile.
  """
  return loss_sums(
    *chunked_log_z_and_target(
      hidden, output_rows, targets, chunk=chunk, final_softcap=final_softcap
    ),
    loss_mask,
  )


def chunked_log_z_and_target(
  hidden: jax.Array,
  output_rows: jax.Array,
  targets: jax.Array,
  *,
  chunk: int,
  final_softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """log_z_and_target of the soft-capped logits, one vocabulary tile at a time."""
  if chunk <= 0:
    raise ValueError(f"vocabulary chunk must be positive, got {chunk}")
  vocab, dim = output_rows.shape
  chunk = min(chunk, vocab)
  count = -(-vocab // chunk)
  rows = jnp.pad(output_rows, ((0, count * chunk - vocab), (0, 0))).reshape(count, chunk, dim)
  real = (jnp.arange(count * chunk) < vocab).reshape(count, chunk)
  starts = jnp.arange(count) * chunk

  @jax.checkpoint  # recompute each tile's logits in the backward instead of keeping them
  def tile(carry, xs):
    m, s, target_logit = carry
    w, real_c, start = xs
    logits = jnp.einsum("btd,vd->btv", hidden, w, preferred_element_type=jnp.float32)
    logits = softcap(logits, final_softcap)
    logits = jnp.where(real_c, logits, _NEG)
    # The running max only keeps exp() in range; log-sum-exp does not depend on it.
    m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(logits, axis=-1)))
    s = s * jnp.exp(m - m_new) + jnp.sum(
      jnp.where(real_c, jnp.exp(logits - m_new[..., None]), 0.0), axis=-1
    )
    local = targets - start
    here = (local >= 0) & (local < chunk)
    picked = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[..., None], -1)[..., 0]
    return (m_new, s, target_logit + jnp.where(here, picked, 0.0)), None

  shape = targets.shape
  init = (
    jnp.full(shape, _NEG, jnp.float32),
    jnp.zeros(shape, jnp.float32),
    jnp.zeros(shape, jnp.float32),
  )
  (m, s, target_logit), _ = jax.lax.scan(tile, init, (rows, real, starts))
  return m + jnp.log(s), target_logit


def loss_moments(
  log_z: jax.Array, target_logit: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sum of token losses, sum of their squares, number of tokens) over loss_mask.

  The squares give the spread of token losses, hence the standard error of a
  held-out loss: std / sqrt(tokens).
  """
  mask = loss_mask.astype(jnp.float32)
  loss = log_z - target_logit
  return jnp.sum(loss * mask), jnp.sum(jnp.square(loss) * mask), jnp.sum(mask)


def loss_sums(
  log_z: jax.Array, target_logit: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sum of token losses, sum of log(Z)^2, number of tokens) over loss_mask."""
  mask = loss_mask.astype(jnp.float32)
  return (jnp.sum((log_z - target_logit) * mask), jnp.sum(jnp.square(log_z) * mask), jnp.sum(mask))
