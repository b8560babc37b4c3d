"""Per-token log-probabilities of a token sequence under a model.

Convention: `token_logprobs(model, ids)[i]` is log p(ids[i + 1] | ids[0..i]), so
a sequence of n ids gets n - 1 values and the first id none (nothing predicts
it). Callers that want the first real token scored prepend a BOS id, as Hugging
Face's Gemma and LLaMA tokenizers do; `with_bos` does that.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core.errors import UserError


class ScoreError(UserError, ValueError):
  """Token ids that cannot be scored by the given model."""


def with_bos(ids: Sequence[int], bos_id: int | None) -> list[int]:
  """`ids` with `bos_id` in front, unless there is none (bos_id None or < 0)."""
  ids = [int(i) for i in ids]
  if bos_id is None or bos_id < 0:
    return ids
  return [int(bos_id)] + ids


def check_ids(ids: np.ndarray, vocab_size: int) -> None:
  bad = ids[(ids < 0) | (ids >= vocab_size)]
  if bad.size:
    raise ScoreError(
      f"token ids {sorted(set(bad.tolist()))[:10]} are outside the model's "
      f"vocabulary [0, {vocab_size})"
    )


def token_logprobs(model: nnx.Module, ids: Sequence[int] | np.ndarray) -> np.ndarray:
  """float32 log p(ids[i+1] | ids[:i+1]) for i in 0..n-2; shape (n - 1,) for 1-D ids.

  A 2-D (B, n) array of equal-length rows gives (B, n - 1).
  """
  return token_scores(model, ids)[0]


def token_scores(
  model: nnx.Module, ids: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """(token_logprobs, is_greedy): is_greedy[i] says ids[i+1] is the argmax after ids[:i+1].

  is_greedy is what lm-eval reports per continuation (all of its tokens greedy).
  """
  tokens = np.asarray(ids, dtype=np.int32)
  squeeze = tokens.ndim == 1
  if squeeze:
    tokens = tokens[None]
  if tokens.ndim != 2:
    raise ScoreError(f"ids must be 1-D or 2-D, got shape {tokens.shape}")
  if tokens.shape[1] < 2:
    raise ScoreError("scoring needs at least 2 token ids (the first one is only context)")
  config = getattr(model, "config", None)
  if config is not None:
    check_ids(tokens, config.vocab_size)
    if config.position_embedding == "learned" and tokens.shape[1] - 1 > config.max_seq_len:
      raise ScoreError(
        f"{tokens.shape[1]} ids need {tokens.shape[1] - 1} positions but the "
        f"learned position table has max_seq_len {config.max_seq_len}"
      )
  graphdef, state = nnx.split(model)
  logp, greedy = (np.asarray(x) for x in _logprobs(graphdef, state, jnp.asarray(tokens)))
  return (logp[0], greedy[0]) if squeeze else (logp, greedy)


@functools.partial(jax.jit, static_argnums=0)
def _logprobs(graphdef, state, tokens):
  # Only the gathered (B, n-1) values leave the device, never (B, n, V) logits.
  logits = nnx.merge(graphdef, state)(tokens[:, :-1])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  targets = tokens[:, 1:]
  greedy = jnp.argmax(logits, axis=-1) == targets
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], greedy
