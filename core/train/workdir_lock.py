"""One trainer per workdir: an exclusive lock on `<workdir>/train.lock` held for the run.

Two trainers on one workdir would log into one MLflow run, interleave rows of
metrics.jsonl, and write the same checkpoints and model. The lock is
`fcntl.flock` on an open file: the kernel drops it when the holding process
ends, however it ends (kill -9 included), so a lock is never stale and needs
no cleanup. The file holds the holder's pid and host, for the message the
second trainer gets; its content means nothing once the lock is free.

flock belongs to an open file, not a path or a process, so a second `acquire`
in the same process conflicts too (a nested train() is refused like any other).
Every process of a multi-process run shares the workdir; process 0 takes the
lock for all of them (core.train.loop.train).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

try:
  import fcntl
except ImportError:  # not POSIX: no lock (the project targets Linux)
  fcntl = None

LOCK_FILE = "train.lock"


class WorkdirBusyError(RuntimeError):
  """Another trainer holds the workdir; the message names its pid and host."""


def lock_path(workdir: str | os.PathLike) -> Path:
  return Path(workdir) / LOCK_FILE


class WorkdirLock:
  """The lock of one workdir. `acquire()` raises WorkdirBusyError when another trainer holds it."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = Path(workdir)
    self.path = lock_path(workdir)
    self._fd: int | None = None

  def acquire(self, wait_s: float = 1.0) -> "WorkdirLock":
    """Takes the lock; retries for `wait_s` (a sweep's probe holds it for microseconds)."""
    if fcntl is None or self._fd is not None:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          os.close(fd)
          raise
        if time.monotonic() >= deadline:
          os.close(fd)
          raise WorkdirBusyError(busy_message(self.workdir, _read(self.path))) from None
        time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(
      fd,
      json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}).encode()
      + b"\n",
      0,
    )
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fd, self._fd = self._fd, None
      os.close(fd)  # closing the only descriptor of the open file drops the lock

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def lock_for_run(workdir: str | os.PathLike, primary: bool) -> WorkdirLock:
  """Process 0 takes the workdir's lock for the run; every process raises if it could not."""
  lock = WorkdirLock(workdir)
  error = None
  if primary:
    try:
      lock.acquire()
    except WorkdirBusyError as e:
      error = e
  import jax  # pylint: disable=g-import-not-at-top  (`ablax tracking sync` needs no JAX)

  if jax.process_count() > 1:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    busy = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if busy and error is None:
      error = WorkdirBusyError(f"{workdir} is being trained by another run (process 0 names it)")
  if error is not None:
    raise error
  return lock


def holder(workdir: str | os.PathLike) -> dict | None:
  """{'pid', 'host', ...} of the trainer holding the workdir's lock; None when nobody does.

  Probes with a shared lock, which an exclusive holder refuses and which is let go at once.
  """
  path = lock_path(workdir)
  if fcntl is None or not path.is_file():
    return None
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      return _read(path) or {"pid": None, "host": None}
    raise
  finally:
    os.close(fd)
  return None


def busy_message(workdir: str | os.PathLike, info: dict | None) -> str:
  info = info or {}
  return (
    f"{workdir} is being trained by pid {info.get('pid', '?')} on "
    f"{info.get('host', '?')}; wait for it, stop it, or use another workdir"
  )


def _read(path: Path) -> dict:
  # The holder writes its pid right after locking; a reader can be a moment early.
  for _ in range(20):
    try:
      text = path.read_text().strip()
      if text:
        return json.loads(text)
    except (OSError, ValueError):
      pass
    time.sleep(0.02)
  return {}
