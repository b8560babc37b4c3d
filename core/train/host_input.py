"""The run's input: the data contract, host-sharded batches, and a prefetching reader.

`TrainData` is what the run's data factory returns and everything the loop reads
of it (core.data.pipeline.LMBatches and core.train.synthetic.SyntheticBatches
implement it).

The global batch of B rows is `data_shards` blocks of B / data_shards rows; block
k comes from its own stream, records k, k + data_shards, ... of every source
(the data factory's shard_index/shard_count). A process builds the blocks that
overlap its rows, keeps those rows, and jax.make_array_from_process_local_data
assembles the global array. So:

- the batches depend on `data_shards` (part of the config), never on how many
  processes read them: 2 processes with data_shards=2 see the batches 1
  process with data_shards=2 sees;
- with data_shards equal to the process count each process reads 1/P of the
  data, so data work per host stays flat as hosts are added;
- data_shards=1 is one stream that every process reads whole (each keeps its rows).

The iterator position of every block is saved in the checkpoint: a process
holds only its own blocks, so `global_state` gathers them from all processes.
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Any, Callable, Iterator, Mapping, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils

from core.errors import UserError
from core.tokenizer import Tokenizer


class TrainData(Protocol):
  """A stream of batches as the data factory returns it, with what the loop reads besides.

  The factory is called as data(batch_size=, seed=, split=, shard_index=,
  shard_count=) (core.data.pipeline.lm_batches bound by gin). Each batch is a
  dict of (batch_size, seq_len) numpy arrays: inputs, targets, segment_ids,
  positions (int32) and loss_mask (float32).

  Attributes:
    seq_len: tokens per row.
    tokenizer: what made the ids, checked against the model's vocabulary and
      exported with the model; None for data that is ids from the start
      (synthetic).
    manifest: what the stream reads (sources, file hashes, tokenizer), for the
      run record; None if it has nothing to record.
  """

  seq_len: int
  tokenizer: Tokenizer | None
  manifest: Mapping[str, Any] | None

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

  def __next__(self) -> dict[str, np.ndarray]: ...

  def get_state(self) -> dict[str, Any]:
    """The position: small and JSON-serializable, saved with each checkpoint."""

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues exactly where the stream that gave `state` was."""


class HostInputError(UserError, ValueError):
  """A batch size, shard count and mesh that do not divide into per-process rows."""


def process_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[int, int]:
  """[lo, hi): the rows of a `shape` array that this process's devices hold (contiguous)."""
  spans = set()
  for index in sharding.addressable_devices_indices_map(shape).values():
    rows = index[0] if index else slice(None)
    start, stop, _ = rows.indices(shape[0])
    spans.add((start, stop))
  ordered = sorted(spans)
  lo, hi = ordered[0][0], max(stop for _, stop in ordered)
  covered = lo
  for start, stop in ordered:
    if start > covered:
      raise HostInputError(
        f"this process holds rows {ordered} of the batch, not one "
        "contiguous range; build the mesh with core.train.mesh.make_mesh"
      )
    covered = max(covered, stop)
  return lo, hi


class HostShardedBatches:
  """This process's rows [lo, hi) of every global batch, from `shards` streams: a TrainData.

  `data` is the run's factory; `shards` says how many streams (TrainData) the
  global batch is made of.
  """

  def __init__(
    self,
    data: Callable[..., TrainData],
    *,
    batch_size: int,
    seed: int,
    shards: int,
    rows: tuple[int, int],
    split: str = "train",
  ):
    if shards < 1 or batch_size % shards:
      raise HostInputError(f"batch_size {batch_size} is not a multiple of data_shards {shards}")
    self.shards, self.rows = shards, rows
    self.block = batch_size // shards
    first, last = rows[0] // self.block, (rows[1] - 1) // self.block
    self.streams = {
      k: data(batch_size=self.block, seed=seed, split=split, shard_index=k, shard_count=shards)
      for k in range(first, last + 1)
    }
    self._offset = rows[0] - first * self.block
    head = self.streams[first]
    self.seq_len: int = head.seq_len
    self.tokenizer: Tokenizer | None = head.tokenizer
    self.manifest: Mapping[str, Any] | None = head.manifest

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    blocks = [next(s) for s in self.streams.values()]
    n = self.rows[1] - self.rows[0]
    return {
      key: np.concatenate([b[key] for b in blocks])[self._offset : self._offset + n]
      for key in blocks[0]
    }

  # -- position ---------------------------------------------------------------------
  # With one stream the state is that stream's own (what checkpoints always held);
  # with several, {"shards": n, "<k>": state of block k}.

  def get_state(self) -> dict[str, Any]:
    if self.shards == 1:
      return self.streams[0].get_state()
    return {"shards": self.shards, **{str(k): s.get_state() for k, s in self.streams.items()}}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if self.shards == 1:
      if "shards" in state:
        raise HostInputError(
          f"the checkpoint's data position is for data_shards="
          f"{state['shards']}, the run has data_shards=1"
        )
      self.streams[0].set_state(state)
      return
    if state.get("shards") != self.shards:
      raise HostInputError(
        f"the checkpoint's data position is for data_shards="
        f"{state.get('shards', 1)}, the run has data_shards={self.shards}"
      )
    for k, stream in self.streams.items():
      stream.set_state(state[str(k)])


def global_state(local: Mapping[str, Any]) -> dict[str, Any]:
  """Every process's block positions merged (all processes call it; the same result on each)."""
  if jax.process_count() == 1 or "shards" not in local:
    return dict(local)
  encoded = np.frombuffer(json.dumps(local).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([encoded.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: encoded.size] = encoded
  gathered = multihost_utils.process_allgather(padded)
  merged: dict[str, Any] = {}
  for row, n in zip(np.asarray(gathered), np.asarray(lengths).reshape(-1)):
    merged.update(json.loads(bytes(row[: int(n)]).decode()))
  return merged


class Prefetch:
  """Reads batches in a thread, each paired with the iterator position after it.

  The position travels with its batch, so a checkpoint taken after step n stores
  exactly "n batches consumed", however far ahead the reader is.
  """

  def __init__(self, iterator: TrainData, depth: int = 2):
    self._it = iterator
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._head = None
    self._thread = threading.Thread(target=self._work, name="ablax-prefetch", daemon=True)
    self._thread.start()

  def _work(self) -> None:
    while not self._stop.is_set():
      try:
        item = (next(self._it), self._it.get_state())
      except BaseException as e:  # noqa: BLE001  handed to the consumer
        item = e
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if isinstance(item, BaseException):
        return

  def peek(self) -> dict[str, np.ndarray]:
    if self._head is None:
      self._head = self._get()
    return self._head[0]

  def _get(self):
    item = self._queue.get()
    if isinstance(item, StopIteration):
      raise RuntimeError("the training data ended before num_steps; use num_epochs=None") from item
    if isinstance(item, BaseException):
      raise item
    return item

  def next(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The next batch and the position after it."""
    if self._head is not None:
      item, self._head = self._head, None
      return item
    return self._get()

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)
