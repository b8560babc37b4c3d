"""The run's one local journal of metrics: `<workdir>/metrics.jsonl`.

One JSON object per line and per logged step, keys as the run record spells
them (core/tracking/schema.py):

  {"step": 10, "time": 1733150000123, "train/loss": 2.31, ..., "eta_s": 41.0}

`step` and `time` (milliseconds since the epoch) say where and when; every
other number is a metric, except the fields in `NOT_METRICS` (the console's
ETA). Lines are only ever appended, so a byte offset into the file says how
much of it a reader (core/tracking/sync.py) has consumed. A line cut by a kill
is removed when the journal is next opened; nothing read it, since readers
stop at the last newline.

A resumed run recomputes the steps between its checkpoint and the
interruption, which the journal (and perhaps the store) already hold:
`Journal.resume(step)` drops each (metric, step) already there, so each
reaches the journal and the store once. The first value stays: a curve never
changes after it was drawn. The recomputed value of a deterministic metric
(loss, norms, learning rate, token and FLOP counts, held-out metrics: same
batches, RNG and compiled step) should equal the first; where it does not, the
difference is reported, since the resumed run is then not the run that was
interrupted. Timing and energy differ between processes by nature and are
dropped without a word.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from core.tracking import schema
from core.tracking.store import clean_key

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
FIELDS = ("eta_s",)  # journal-only entries a caller may add: the console's ETA
NOT_METRICS = ("step", "time", *FIELDS)
# Differ between two executions of the same step: not compared, only de-duplicated.
NONDETERMINISTIC = (schema.TOKENS_PER_S, schema.MFU, "train/step_time_s", schema.COMPILE_S)
NONDETERMINISTIC_PREFIXES = (schema.ENERGY, schema.SYSTEM)
REL_TOL, ABS_TOL = 1e-5, 1e-8


def compared(key: str) -> bool:
  return key not in NONDETERMINISTIC and not key.startswith(NONDETERMINISTIC_PREFIXES)


def check_fields(fields: Mapping[str, Any]) -> None:
  unknown = set(fields) - set(FIELDS)
  if unknown:
    raise ValueError(f"journal fields are {FIELDS}, not {sorted(unknown)}")


def metrics_of(line: Mapping[str, Any]) -> dict[str, float]:
  """The metrics of one journal line."""
  return {k: v for k, v in line.items() if k not in NOT_METRICS}


def read(path: str | os.PathLike, offset: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
  """(offset after the line, line) for every complete line from byte `offset` on."""
  path = Path(path)
  if not path.is_file():
    return
  with open(path, "rb") as f:
    f.seek(offset)
    for raw in f:
      if not raw.endswith(b"\n"):
        return  # being written, or cut by a kill
      offset += len(raw)
      if raw.strip():
        try:
          yield offset, json.loads(raw)
        except json.JSONDecodeError:
          logger.warning("%s: an unreadable line before byte %d; skipped", path, offset)


def size(path: str | os.PathLike) -> int:
  """Bytes of complete lines in the journal."""
  path = Path(path)
  if not path.is_file():
    return 0
  with open(path, "rb") as f:
    end = f.seek(0, os.SEEK_END)
    while end > 0:
      start = max(0, end - 65536)
      f.seek(start)
      newline = f.read(end - start).rfind(b"\n")
      if newline >= 0:
        return start + newline + 1
      end = start
  return 0


class Journal:
  """Appends lines to `<workdir>/metrics.jsonl`; one writer per workdir (the trainer's lock)."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = Path(workdir) / METRICS_FILE
    self._redone: dict[tuple[str, int], float] = {}
    self._say: Callable[[str], None] = print
    self.mismatches: list[tuple[str, int, float, float]] = []
    self.path.parent.mkdir(parents=True, exist_ok=True)
    complete = size(self.path)
    if self.path.is_file() and self.path.stat().st_size != complete:
      os.truncate(self.path, complete)  # the tail a kill cut
    self._file = None

  def resume(self, step: int, say: Callable[[str], None] = print) -> None:
    """From now on, drops (metric, step) pairs the journal holds at `step` or later."""
    self._say = say
    for _, line in read(self.path):
      s = int(line.get("step", -1))
      if s >= step:
        for key, value in metrics_of(line).items():
          self._redone.setdefault((key, s), value)

  def append(self, metrics: Mapping[str, Any], step: int, **fields: Any) -> None:
    """Writes one line now: `metrics` at `step` (core.tracking.journal.Writer does it later)."""
    check_fields(fields)
    self.write([self.line(metrics, step, time.time(), fields)])

  def line(
    self, metrics: Mapping[str, Any], step: Any, stamp_s: float, fields: Mapping[str, Any]
  ) -> str | None:
    """The JSON line of `metrics` (numbers; others are dropped with a warning) at `step`,
    logged at `stamp_s`; None when nothing of it is new (all of it journaled before a resume).

    Values are read here: a JAX scalar waits for its step. `fields` are entries of FIELDS,
    which no store receives.
    """
    step = int(step)
    line: dict[str, Any] = {"step": step, "time": int(stamp_s * 1000)}
    for key, value in metrics.items():
      key = clean_key(key)
      try:
        value = float(value)
      except (TypeError, ValueError):
        logger.warning("metric %r=%r is not a number; dropped", key, value)
        continue
      if not self._redone_before(key, step, value):
        line[key] = value
    if len(line) == 2:
      return None
    line.update(fields)
    return json.dumps(line) + "\n"

  def write(self, lines: list[str | None]) -> None:
    """Appends `lines` (Nones skipped) in one write."""
    text = "".join(line for line in lines if line)
    if not text:
      return
    if self._file is None:
      self._file = open(self.path, "a", encoding="utf-8")
    self._file.write(text)
    self._file.flush()  # in the kernel, so safe from a kill -9

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def _redone_before(self, key: str, step: int, value: float) -> bool:
    """Whether (key, step) is already in the journal (from before a resume); reports changes."""
    old = self._redone.get((key, step))
    if old is None:
      return False
    if compared(key) and not _same(old, value):
      self.mismatches.append((key, step, old, value))
      message = (
        f"resumed run differs from the interrupted one: {key} at step {step} was "
        f"{old!r} when first logged, now {value!r} (the journal keeps the first)"
      )
      logger.warning(message)
      self._say(message)
    return True


def _same(a: float, b: float) -> bool:
  if math.isnan(a) or math.isnan(b):
    return math.isnan(a) and math.isnan(b)
  return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)


_STOP = object()


class Writer:
  """Feeds a Journal from its own thread, so logging a step costs the caller a queue put.

  The thread reads the values (a JAX scalar waits for its step there, not in the
  training loop), encodes them and appends the lines in the order they were put,
  in one write per `interval_s` at most, which keeps its share of the GIL small.
  A kill -9 loses what was put and not written yet: at most the last `interval_s`.
  """

  def __init__(self, journal: Journal, interval_s: float = 0.1):
    self.journal = journal
    self.interval_s = interval_s
    self._queue: queue.SimpleQueue = queue.SimpleQueue()
    self._wake = threading.Event()  # a drain or close: write now
    self._thread = threading.Thread(target=self._run, name="ablax-journal", daemon=True)
    self._thread.start()

  def put(self, metrics: Mapping[str, Any], step: Any, fields: Mapping[str, Any]) -> None:
    """Queues one line; `metrics` is copied, its values are read later."""
    if fields:
      check_fields(fields)
    self._queue.put((dict(metrics), step, fields, time.time()))

  @property
  def queued(self) -> int:
    """Lines put and not written yet (about)."""
    return self._queue.qsize()

  def drain(self, timeout: float | None = None) -> bool:
    """Waits until everything put so far is written; False when `timeout` passed first."""
    if not self._thread.is_alive():
      return self._queue.empty()
    done = threading.Event()
    self._queue.put(done)
    self._wake.set()
    return done.wait(timeout)

  def close(self, timeout: float | None = None) -> bool:
    """Writes everything put so far and stops; False when `timeout` passed first."""
    if self._thread.is_alive():
      self._queue.put(_STOP)
      self._wake.set()
      self._thread.join(timeout)
      if self._thread.is_alive():
        return False
    self.journal.close()
    return True

  def _run(self) -> None:
    while True:
      items = [self._queue.get()]
      self._wake.wait(self.interval_s)
      self._wake.clear()
      try:
        while True:
          items.append(self._queue.get_nowait())
      except queue.Empty:
        pass
      lines: list[str | None] = []
      for item in items:
        if item is _STOP or isinstance(item, threading.Event):
          self._write(lines)
          lines = []
          if item is _STOP:
            return
          item.set()
          continue
        metrics, step, fields, stamp = item
        try:
          lines.append(self.journal.line(metrics, step, stamp, fields))
        except Exception:  # noqa: BLE001  one bad line must not stop the journal
          logger.exception("metrics at step %r not journaled", step)
      self._write(lines)

  def _write(self, lines: list[str | None]) -> None:
    try:
      self.journal.write(lines)
    except OSError:
      logger.exception("cannot append to %s; %d lines lost", self.journal.path, len(lines))
