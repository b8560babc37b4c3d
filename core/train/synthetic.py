"""Synthetic LM batches with the data layer's interface (TrainData), for tests and benchmarks.

`synthetic_batches(...)` takes the same keyword arguments as
core.data.pipeline.lm_batches and yields the same dict of arrays, but its
tokens are a cheap deterministic function of (seed, step): benchmarks measure
the model, not the tokenizer, and tests need no corpus. The sequences follow
a fixed random bigram table, so a model can learn them and losses fall.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np


class SyntheticBatches:
  """Rows of packed "documents" drawn from a bigram chain; state = the step."""

  def __init__(
    self,
    *,
    vocab_size: int,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    split: str = "train",
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    doc_len: int = 0,
    **unused: Any,
  ):
    del unused  # the data layer's other options (sources, tokenizer...) do not apply
    self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
    self.seed = seed + (1_000_003 if split == "validation" else 0)
    self.shard_index, self.shard_count = shard_index, shard_count
    self.doc_len = doc_len or max(seq_len // 2, 2)
    self.limit = None if num_epochs is None else 4 * num_epochs
    table_rng = np.random.default_rng(seed)  # the same language for train and validation
    self.next_token = table_rng.integers(1, vocab_size, size=(vocab_size, 4))
    self.step = 0
    self.tokenizer = None  # the ids are the data: no tokenizer made them

  @property
  def manifest(self) -> dict:
    return {
      "synthetic": {
        "vocab_size": self.vocab_size,
        "seq_len": self.seq_len,
        "batch_size": self.batch_size,
        "seed": self.seed,
      }
    }

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.limit is not None and self.step >= self.limit:
      raise StopIteration
    rng = np.random.default_rng((self.seed, self.step, self.shard_index))
    b, t = self.batch_size, self.seq_len
    tokens = np.empty((b, t + 1), np.int32)
    tokens[:, 0] = rng.integers(1, self.vocab_size, size=b)
    choice = rng.integers(0, 4, size=(b, t))
    for i in range(t):
      tokens[:, i + 1] = self.next_token[tokens[:, i], choice[:, i]]
    index = np.arange(t)
    positions = np.broadcast_to(index % self.doc_len, (b, t)).astype(np.int32)
    segment_ids = np.broadcast_to(index // self.doc_len + 1, (b, t)).astype(np.int32)
    self.step += 1
    return {
      "inputs": tokens[:, :-1].copy(),
      "targets": tokens[:, 1:].copy(),
      "segment_ids": segment_ids.copy(),
      "positions": positions.copy(),
      "loss_mask": np.ones((b, t), np.float32),
    }

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.step = int(state["step"])


def synthetic_batches(**kwargs: Any) -> SyntheticBatches:
  return SyntheticBatches(**kwargs)
