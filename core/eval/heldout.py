"""Held-out loss, perplexity and bits per byte, per source and per domain.

Loss and perplexity are per token, so they depend on the tokenizer: a model with
a smaller vocabulary predicts more, easier tokens. Bits per byte divides the
total negative log-likelihood (in bits) by the UTF-8 bytes of the text those
tokens spell, which is the same text whatever the tokenizer, so tokenizer-subset
ablations compare fairly. Bytes are counted from the target ids with a per-id
table (`token_byte_lengths`): a byte-fallback piece is one byte, SentencePiece's
'▁' is a space, control pieces (bos, eos, pad) spell nothing.

Batches are the packed LM batches of core.data (dicts of (B, T) arrays:
inputs, targets, segment_ids, positions, loss_mask). Only targets with
loss_mask > 0 count.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core import progress
from core.tracking import schema

_META = "\u2581"


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
  """int32 (vocab_size,): UTF-8 bytes that each id contributes to decoded text.

  `tokenizer` is a core.tokenizer.Tokenizer (or anything with `.processor`, a
  SentencePieceProcessor).
  """
  sp = getattr(tokenizer, "processor", tokenizer)
  n = int(sp.GetPieceSize())
  lengths = np.zeros(n, np.int32)
  for i in range(n):
    if sp.IsControl(i) or sp.IsUnknown(i):
      continue
    if sp.IsByte(i):
      lengths[i] = 1
    else:
      lengths[i] = len(sp.IdToPiece(i).replace(_META, " ").encode("utf-8"))
  return lengths


@functools.partial(jax.jit, static_argnums=0)
def _batch_nll(graphdef, state, inputs, targets, segment_ids, positions, loss_mask):
  model = nnx.merge(graphdef, state)
  logits = model(inputs, positions, segment_ids).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * loss_mask), jnp.sum(loss_mask)


class _Totals:
  def __init__(self):
    self.nll = 0.0
    self.tokens = 0.0
    self.bytes = 0

  def add(self, other: "_Totals") -> None:
    self.nll += other.nll
    self.tokens += other.tokens
    self.bytes += other.bytes

  def metrics(self, with_bytes: bool) -> dict[str, float]:
    if self.tokens == 0:
      return {"tokens": 0.0}
    loss = self.nll / self.tokens
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": self.tokens}
    if with_bytes and self.bytes > 0:
      out["bits_per_byte"] = self.nll / (math.log(2) * self.bytes)
      out["bytes"] = float(self.bytes)
    return out


def evaluate(
  model: nnx.Module,
  batches: Mapping[str, Iterable[Mapping[str, Any]]] | Iterable[Mapping[str, Any]],
  *,
  tokenizer: Any = None,
  byte_lengths: np.ndarray | None = None,
  domains: Mapping[str, str] | None = None,
  max_batches: int | None = None,
  prefix: str = schema.EVAL_HELDOUT,
) -> dict[str, float]:
  """Held-out metrics of `model`.

  Args:
    model: a core.model Transformer.
    batches: source name -> iterable of batches, or one iterable (source 'all').
    tokenizer: the model's tokenizer, for bits per byte (or give byte_lengths).
    byte_lengths: token_byte_lengths(tokenizer), to compute it once per run.
    domains: source name -> domain name, to also report each domain's totals
      (e.g. {'stdlib_code': 'code', 'github': 'code', 'wiki': 'prose'}).
    max_batches: read at most this many batches of each source.
    prefix: first part of every metric name.

  Returns:
    {f'{prefix}/{source}/loss': ..., '.../perplexity', '.../bits_per_byte',
     '.../tokens', '.../bytes', the same over all sources as f'{prefix}/loss',
     ..., and per domain as f'{prefix}/domain/{domain}/loss', ...}. Loss is the
    mean negative log-likelihood per target token in nats.
  """
  if not isinstance(batches, Mapping):
    batches = {"all": batches}
  if byte_lengths is None and tokenizer is not None:
    byte_lengths = token_byte_lengths(tokenizer)
  with_bytes = byte_lengths is not None
  graphdef, state = nnx.split(model)
  per_source: dict[str, _Totals] = {}
  for name, source in batches.items():
    totals = per_source[name] = _Totals()
    read = source if max_batches is None else itertools.islice(source, max_batches)
    for batch in progress.track(read, f"held-out loss: {name}", total=max_batches):
      arrays = [jnp.asarray(batch[k]) for k in ("inputs", "targets", "segment_ids", "positions")]
      mask = np.asarray(batch["loss_mask"], np.float32)
      nll, count = _batch_nll(graphdef, state, *arrays, jnp.asarray(mask))
      totals.nll += float(nll)
      totals.tokens += float(count)
      if with_bytes:
        targets = np.asarray(batch["targets"])
        if targets.max(initial=0) >= len(byte_lengths):
          raise ValueError(
            f"target ids reach {targets.max()} but the byte table has "
            f"{len(byte_lengths)} ids: wrong tokenizer for these batches?"
          )
        totals.bytes += int(np.sum(byte_lengths[targets] * (mask > 0)))
  metrics: dict[str, float] = {}
  overall = _Totals()
  by_domain: dict[str, _Totals] = {}
  for name, totals in per_source.items():
    overall.add(totals)
    for key, value in totals.metrics(with_bytes).items():
      metrics[f"{prefix}/{name}/{key}"] = value
    if domains and name in domains:
      by_domain.setdefault(domains[name], _Totals()).add(totals)
  for domain, totals in by_domain.items():
    for key, value in totals.metrics(with_bytes).items():
      metrics[f"{prefix}/domain/{domain}/{key}"] = value
  for key, value in overall.metrics(with_bytes).items():
    metrics[f"{prefix}/{key}"] = value
  return metrics
