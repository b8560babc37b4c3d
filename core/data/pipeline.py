"""The language-model batch pipeline: sources -> documents -> tokens -> packed rows -> batches.

`lm_batches(...)` returns an LMBatches iterator. Everything it reads is decided
by the arguments and the seed:

- each source is read through a grain MapDataset: this process's shard of the
  records (every shard_count-th record from shard_index), shuffled by a seed
  derived from (seed, source name), repeated with a new shuffle each epoch.
  Reading record k of that order is random access, so a source's position is
  one integer, its cursor;
- documents are tokenized as [bos] + text + [eos] and packed into rows
  (packing.py). Each piece of a row comes from the source furthest behind its
  share of tokens in the current stage (mixture.py); the choice is made at
  every row start and document end;
- every source keeps `interleave` documents in progress, one per lane, and
  consecutive rows take turns over the lanes (row k uses lane k mod
  interleave). A document cut at a row end goes on in the next row of its
  lane, so one long document fills every interleave-th row instead of whole
  batches: otherwise a 100k-token file makes every variant's train loss jump
  in lockstep for dozens of steps.

So the whole position is small: the step, one cursor per source, the record
index and offset of each lane's document in progress, and the tokens delivered
per source. `get_state()` returns it as a JSON-ready dict; `set_state()`
re-reads and re-tokenizes the documents in progress and goes on exactly where
the saved iterator was.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from core.data import mixture, packing
from core.data.default_tokenizer import default_tokenizer
from core.data.errors import DataError
from core.data.sources import open_sources
from core.tokenizer.spm import Tokenizer, load_tokenizer

STATE_VERSION = 2
# Documents in progress per source (see the module docstring); 16 keeps the saved
# position under 1 KB for two sources while a batch of 8-16 rows mixes 8-16 documents.
DEFAULT_INTERLEAVE = 16
SPLITS = ("train", "validation")


def derived_seed(seed: int, name: str) -> int:
  """A per-source seed: independent streams whatever the order of the sources."""
  digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
  return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def resolve_tokenizer(tokenizer: Tokenizer | str | None) -> Tokenizer:
  if tokenizer is None:
    return default_tokenizer()
  if isinstance(tokenizer, (str, os.PathLike)):
    return load_tokenizer(tokenizer)
  return tokenizer


class LMBatches:
  """An iterator of packed LM batches with a small, exact, restorable state.

  Yields dicts of (batch_size, seq_len) numpy arrays: inputs, targets,
  segment_ids, positions (int32) and loss_mask (float32). See lm_batches.
  """

  def __init__(
    self,
    *,
    sources: Any,
    tokenizer: Tokenizer | str | None,
    seq_len: int,
    batch_size: int,
    seed: int,
    split: str = "train",
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    weights: Mapping[str, float] | None = None,
    stages: Sequence[tuple[int, Mapping[str, float]]] | None = None,
    add_bos: bool = True,
    add_eos: bool = True,
    shuffle: bool | None = None,
    interleave: int = DEFAULT_INTERLEAVE,
  ):
    _check_args(seq_len, batch_size, split, shard_index, shard_count, num_epochs, interleave)
    self.seq_len, self.batch_size = int(seq_len), int(batch_size)
    self.interleave = int(interleave)
    self.seed, self.split = int(seed), split
    self.shard_index, self.shard_count = int(shard_index), int(shard_count)
    self.num_epochs = None if num_epochs is None else int(num_epochs)
    self.shuffle = (split == "train") if shuffle is None else bool(shuffle)
    self._sources = open_sources(sources, split)
    self.names = tuple(self._sources)
    self.schedule = mixture.Schedule(self.names, weights, stages)
    self._datasets = {n: self._dataset(n, s) for n, s in self._sources.items()}
    # After the sources: a bad source is reported before a default tokenizer is built.
    self.tokenizer = resolve_tokenizer(tokenizer)
    self._prefix = [self.tokenizer.bos_id] if add_bos and self.tokenizer.bos_id >= 0 else []
    self._suffix = [self.tokenizer.eos_id] if add_eos and self.tokenizer.eos_id >= 0 else []
    self._config = {
      "seq_len": self.seq_len,
      "batch_size": self.batch_size,
      "seed": self.seed,
      "split": split,
      "shard_index": self.shard_index,
      "shard_count": self.shard_count,
      "num_epochs": self.num_epochs,
      "shuffle": self.shuffle,
      "sources": list(self.names),
      "interleave": self.interleave,
      "records": {n: len(s) for n, s in self._sources.items()},
      "schedule": self.schedule.describe(),
      "tokenizer_sha256": self.tokenizer.sha256,
      "add_bos": bool(self._prefix),
      "add_eos": bool(self._suffix),
    }
    self._reset()

  def _dataset(self, name: str, source: Any) -> grain.MapDataset:
    if len(source) == 0:
      raise DataError(f"source {name!r} ({source.name}) has no documents in split {self.split!r}")
    if len(source) < self.shard_count:
      raise DataError(
        f"source {name!r} has {len(source)} documents, fewer than the "
        f"{self.shard_count} shards (processes) reading it; use fewer processes or "
        "a larger dataset"
      )
    ds = grain.MapDataset.source(source)
    if self.shard_count > 1:
      ds = ds.slice(slice(self.shard_index, None, self.shard_count))
    if self.shuffle:
      ds = ds.shuffle(seed=derived_seed(self.seed, name))
    return ds.repeat(self.num_epochs)

  def _reset(self) -> None:
    self._step = 0
    self._cursors = {n: 0 for n in self.names}
    self._stage = 0
    self._delivered = {n: 0 for n in self.names}
    self._total = {n: 0 for n in self.names}
    # name -> {lane: [tokens, offset, record index]}: the documents in progress.
    self._open: dict[str, dict[int, list]] = {n: {} for n in self.names}
    self._done = False

  # -- public ---------------------------------------------------------------------

  @property
  def step(self) -> int:
    """Batches produced so far (the step of the next batch)."""
    return self._step

  @property
  def tokens_by_source(self) -> dict[str, int]:
    """Tokens placed in batches so far, per source (padding excluded)."""
    return dict(self._total)

  @property
  def manifest(self) -> dict:
    """What this pipeline reads, for the run record."""
    return {
      "sources": {n: s.manifest for n, s in self._sources.items()},
      "tokenizer": {
        "path": self.tokenizer.path,
        "sha256": self.tokenizer.sha256,
        "vocab_size": self.tokenizer.vocab_size,
      },
      "python_version": platform.python_version(),
      "config": self._config,
    }

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._done:
      raise StopIteration
    stage = self.schedule.stage_at(self._step)
    if stage != self._stage:
      self._stage = stage
      self._delivered = {n: 0 for n in self.names}
    weights = self.schedule.weights[stage]
    rows = packing.empty_rows(self.batch_size, self.seq_len)
    placed = 0
    for r in range(self.batch_size):
      start, segment = 0, 0
      lane = (self._step * self.batch_size + r) % self.interleave
      while start < self.seq_len:
        piece = self._next_piece(weights, lane)
        if piece is None:
          self._done = True
          break
        name, used_lane = piece
        doc = self._open[name][used_lane]
        tokens, offset = doc[0], doc[1]
        take = min(len(tokens) - offset, self.seq_len - start)
        segment += 1
        packing.put_piece(rows, r, start, segment, tokens[offset : offset + take])
        doc[1] = offset + take
        if doc[1] >= len(tokens):
          del self._open[name][used_lane]
        self._delivered[name] += take
        self._total[name] += take
        start += take
        placed += take
      if self._done:
        break
    if placed == 0:
      raise StopIteration
    self._step += 1
    return rows

  def get_state(self) -> dict:
    """The iterator position: small and JSON-serializable."""
    # Per source, [lane, record index, offset] of each document in progress.
    current = {
      name: [[lane, doc[2], doc[1]] for lane, doc in sorted(lanes.items())]
      for name, lanes in self._open.items()
      if lanes
    }
    return {
      "version": STATE_VERSION,
      "step": self._step,
      "cursors": dict(self._cursors),
      "stage": self._stage,
      "delivered": dict(self._delivered),
      "tokens": dict(self._total),
      "current": current,
      "done": self._done,
      "config_hash": self.config_hash(),
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a get_state() of an iterator with the same configuration."""
    if state.get("version") != STATE_VERSION:
      raise DataError(
        f"data iterator state version {state.get('version')!r} is not "
        f"{STATE_VERSION}; it was saved by another ablax version"
      )
    if state.get("config_hash") != self.config_hash():
      raise DataError(
        "the data iterator state was saved by a pipeline with another "
        "configuration (sources, seed, seq_len, batch_size, shard, tokenizer or "
        "schedule differ); resume with the configuration of the saved run. "
        f"This pipeline: {json.dumps(self._config)[:600]}"
      )
    self._reset()
    self._step = int(state["step"])
    self._cursors = {n: int(state["cursors"][n]) for n in self.names}
    self._stage = int(state["stage"])
    self._delivered = {n: int(state["delivered"][n]) for n in self.names}
    self._total = {n: int(state["tokens"][n]) for n in self.names}
    self._done = bool(state.get("done", False))
    for name, lanes in state["current"].items():
      for lane, index, offset in lanes:
        self._open[name][int(lane)] = [self._tokens(name, int(index)), int(offset), int(index)]

  def config_hash(self) -> str:
    return hashlib.sha256(json.dumps(self._config, sort_keys=True).encode()).hexdigest()[:16]

  # -- reading ---------------------------------------------------------------------

  def _tokens(self, name: str, index: int) -> np.ndarray:
    text = self._datasets[name][index]
    return np.asarray(self._prefix + self.tokenizer.encode(text) + self._suffix, np.int32)

  def _next_piece(self, weights: Mapping[str, float], lane: int) -> tuple[str, int] | None:
    """(source, lane) of the next piece of a row of this lane; None when all are exhausted.

    The source is chosen again at every row boundary and document end, so each
    source's share follows its weight to within a row, and a long document
    does not hold the mixture until it ends. Once a finite source has no
    record left to open, its other lanes' documents are drained in order, so
    an evaluation pass still reads every document exactly once.
    """
    while True:
      available = [
        n for n in self.names if self._open[n] or self._cursors[n] < len(self._datasets[n])
      ]
      if not available:
        return None
      name = mixture.pick_source(weights, self._delivered, available)
      if name is None:
        if self.num_epochs is None:
          raise DataError(f"every source with a positive weight is exhausted ({weights})")
        # A finite read (evaluation) reads every document, weight or not.
        name = available[0]
      lanes = self._open[name]
      if lane in lanes:
        return name, lane
      index = self._cursors[name]
      if index >= len(self._datasets[name]):
        return name, min(lanes)
      self._cursors[name] = index + 1
      tokens = self._tokens(name, index)
      if len(tokens):
        lanes[lane] = [tokens, 0, index]
        return name, lane


def _check_args(
  seq_len, batch_size, split, shard_index, shard_count, num_epochs, interleave
) -> None:
  if not isinstance(seq_len, int) or seq_len < 2:
    raise DataError(f"seq_len must be an int >= 2, got {seq_len!r}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
  if split not in SPLITS:
    raise DataError(f"split must be one of {SPLITS}, got {split!r}")
  if not 0 <= shard_index < shard_count:
    raise DataError(f"shard_index must be in [0, shard_count={shard_count}), got {shard_index}")
  if num_epochs is not None and num_epochs < 1:
    raise DataError(f"num_epochs must be None (repeat forever) or >= 1, got {num_epochs}")
  if not isinstance(interleave, int) or interleave < 1:
    raise DataError(
      f"interleave (documents in progress per source) must be an int >= 1, got {interleave!r}"
    )


def lm_batches(
  *,
  sources: Any,
  seq_len: int,
  batch_size: int,
  seed: int = 0,
  tokenizer: Tokenizer | str | None = None,
  split: str = "train",
  shard_index: int = 0,
  shard_count: int = 1,
  num_epochs: int | None = None,
  weights: Mapping[str, float] | None = None,
  stages: Sequence[tuple[int, Mapping[str, float]]] | None = None,
  add_bos: bool = True,
  add_eos: bool = True,
  shuffle: bool | None = None,
  interleave: int = DEFAULT_INTERLEAVE,
  start_state: Mapping[str, Any] | None = None,
) -> LMBatches:
  """Packed LM batches from a mixture of text sources.

  Args:
    sources: name -> source spec (Embedded/Tfds/LocalFiles or a string such as
      'embedded:code', 'tfds:lm1b', 'files:corpus/*.txt'); a single spec or a
      list also works and takes names from the specs.
    seq_len: tokens per row.
    batch_size: rows per batch (the global batch of this process).
    seed: decides the order of every source.
    tokenizer: a Tokenizer, a model path, or None for default_tokenizer().
    split: 'train' or 'validation'.
    shard_index, shard_count: this process reads records shard_index,
      shard_index + shard_count, ... of every source (disjoint across processes).
    num_epochs: passes over each source; None repeats forever. With a finite
      number the iterator ends, padding its last batch (loss_mask 0).
    weights: name -> share of tokens (default: equal); or
    stages: ((start_step, weights), ...), the first starting at 0.
    add_bos, add_eos: frame each document with the tokenizer's bos/eos.
    shuffle: shuffle each source (default: only for 'train').
    interleave: documents in progress per source; row k continues the
      document of lane k mod interleave (1: documents strictly in order).
    start_state: a get_state() to resume from.
  """
  batches = LMBatches(
    sources=sources,
    tokenizer=tokenizer,
    seq_len=seq_len,
    batch_size=batch_size,
    seed=seed,
    split=split,
    shard_index=shard_index,
    shard_count=shard_count,
    num_epochs=num_epochs,
    weights=weights,
    stages=stages,
    add_bos=add_bos,
    add_eos=add_eos,
    shuffle=shuffle,
    interleave=interleave,
  )
  if start_state is not None:
    batches.set_state(start_state)
  return batches
