"""The live view of a running sweep: each running point's step, loss and ETA, read from its log.

The points are `ablax train` processes writing their progress lines to
`<workdir>/logs/<point>.log`; the parent only reads those files, so the view
costs the children nothing and shows exactly what their logs say. On a
terminal it is a rich table redrawn every second; elsewhere (a pipe, a batch
job's log) it prints one plain status line per running point every
`interval_s` seconds, so a log file still shows progress.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.live import Live
from rich.table import Table

# What core/train/loop.py prints (its progress and held-out lines).
_STEP = re.compile(
  r"^step (\d+)/(\d+) \| loss ([0-9.naninf]+) \| ([^|]+) tok/s \| "
  r"MFU ([0-9.]+)% \| ETA (.+?)\s*$",
  re.M,
)
_EVAL = re.compile(r"^step (\d+) \| held-out loss ([0-9.]+)", re.M)
# Only the end of a log is read each time: progress lines are short and come last.
_TAIL_BYTES = 16384


@dataclasses.dataclass
class Progress:
  step: int = 0
  num_steps: int = 0
  loss: str = ""
  tokens_per_s: str = ""
  mfu: str = ""
  eta: str = ""
  eval_loss: str = ""


def read_progress(log: Path) -> Progress:
  """The newest progress and held-out lines of a point's log (empty fields if none yet)."""
  try:
    with open(log, "rb") as f:
      f.seek(0, 2)
      f.seek(max(0, f.tell() - _TAIL_BYTES))
      text = f.read().decode("utf-8", "replace")
  except OSError:
    return Progress()
  out = Progress()
  steps = _STEP.findall(text)
  if steps:
    step, total, loss, rate, mfu, eta = steps[-1]
    out = Progress(int(step), int(total), loss, rate.strip(), mfu, eta)
  evals = _EVAL.findall(text)
  if evals:
    out.eval_loss = evals[-1][1]
  return out


@dataclasses.dataclass
class _Running:
  label: str
  log: Path
  started: float


class SweepView:
  """Call started()/finished() as points start and end; stop() at the end of the sweep."""

  def __init__(
    self,
    total: int,
    console: Console | None = None,
    interval_s: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
  ):
    self.total, self.interval_s, self.clock = total, interval_s, clock
    self.console = console or Console(stderr=True)
    self._running: dict[str, _Running] = {}
    self._done = 0
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._live: Live | None = None

  # -- events from the runner -------------------------------------------------------------

  def started(self, key: str, label: str, log: Path) -> None:
    with self._lock:
      self._running[key] = _Running(label, Path(log), self.clock())
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, daemon=True)
      self._thread.start()

  def finished(self, key: str) -> None:
    with self._lock:
      self._running.pop(key, None)
      self._done += 1

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(5)
    if self._live is not None:
      self._live.stop()

  # -- what is shown ----------------------------------------------------------------------

  def table(self) -> Table:
    table = Table(title=f"sweep: {self._done}/{self.total} points done", title_justify="left")
    for column in ("point", "step", "loss", "held-out", "tok/s", "MFU", "ETA", "elapsed"):
      table.add_column(column, justify="left" if column == "point" else "right")
    with self._lock:
      running = list(self._running.values())
    for r in running:
      p = read_progress(r.log)
      step = f"{p.step}/{p.num_steps}" if p.num_steps else "starting"
      table.add_row(
        r.label,
        step,
        p.loss,
        p.eval_loss,
        p.tokens_per_s,
        f"{p.mfu}%" if p.mfu else "",
        p.eta,
        f"{self.clock() - r.started:.0f} s",
      )
    return table

  def lines(self) -> list[str]:
    """The plain form: one line per running point."""
    with self._lock:
      running = list(self._running.values())
    out = []
    for r in running:
      p = read_progress(r.log)
      where = f"step {p.step}/{p.num_steps}" if p.num_steps else "starting"
      extra = "".join(
        f" | {name} {value}"
        for name, value in (("loss", p.loss), ("held-out", p.eval_loss), ("ETA", p.eta))
        if value
      )
      out.append(f"  running {r.label}: {where}{extra} | {self.clock() - r.started:.0f} s")
    return out

  def _loop(self) -> None:
    if self.console.is_terminal:
      self._live = Live(self.table(), console=self.console, refresh_per_second=1, transient=True)
      self._live.start()
      while not self._stop.wait(1.0):
        self._live.update(self.table())
      return
    while not self._stop.wait(self.interval_s):
      for line in self.lines():
        self.console.print(line, highlight=False, soft_wrap=True)
