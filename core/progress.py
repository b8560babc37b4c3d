"""Progress on stderr for long work: a bar when the total is known, a spinner when it is not.

Both draw only on a terminal and vanish when done (a finished step leaves the
line its caller prints, not a screenful); in a pipe or a batch log they draw
nothing, since a redrawn bar there is one line per update. stdout stays for
what commands print as their result (e.g. --json).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _console():
  from rich.console import Console  # pylint: disable=g-import-not-at-top

  return Console(stderr=True)


def track(items: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
  """Yields `items`, advancing a bar labelled `label` (total: len(items) when it has one)."""
  from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,  # pylint: disable=g-import-not-at-top
    TimeElapsedColumn,
    TimeRemainingColumn,
  )

  console = _console()
  if total is None and hasattr(items, "__len__"):
    total = len(items)  # type: ignore[arg-type]
  with Progress(
    "{task.description}",
    BarColumn(),
    MofNCompleteColumn(),
    TimeElapsedColumn(),
    TimeRemainingColumn(),
    console=console,
    transient=True,
    disable=not console.is_terminal,
  ) as progress:
    task = progress.add_task(label, total=total)
    for item in items:
      yield item
      progress.advance(task)


@contextlib.contextmanager
def status(label: str) -> Iterator[None]:
  """A spinner with `label` while the block runs (for work that reports no progress)."""
  console = _console()
  if not console.is_terminal:
    yield
    return
  with console.status(label):
    yield
