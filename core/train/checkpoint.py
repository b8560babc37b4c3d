"""Checkpoints: orbax CheckpointManager with keep-N, async writes, and a fallback past bad ones.

A checkpoint is one step directory with three items: `state` (the TrainState:
parameters, optimizer state, step and RNG, each array restored straight into
its shards), `data` (the data iterator position, JSON) and `meta` (JSON:
step, wall time, run id). Orbax writes a step into a temporary directory and
renames it when complete, so a run killed mid-save leaves no step that looks
finished. A step that is there but cannot be read (a truncated or deleted
file) is reported, removed, and the previous step is used.

A save that cannot be written (a full disk, a directory that became
read-only) stops the run at once with CheckpointWriteError naming the path and
the OS error: training on without checkpoints would lose the work, and a step
directory orbax cannot create leaves its writer threads waiting out a
300-second barrier at exit. So each save first proves the directory writable
the way orbax starts a save (a new directory in it), and the error of an
earlier background save (surfacing at the next save or wait) is raised the same way.
Saves start from a daemon thread, so orbax's threads are daemons too: those
of a failed save never hold the process at exit (every other path waits for
the saves to finish before returning).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from core.errors import UserError

logger = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
  """No checkpoint could be restored although some exist."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; the message names the step, the path and the OS error."""


class Checkpointer:
  """Saves and restores train state, data position and run metadata under `directory`."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).resolve()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      enable_async_checkpointing=async_save,
      # Keep-N is counted over finished steps only; a step being written is never deleted.
      cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.failed: CheckpointWriteError | None = None
    self._step: int | None = None  # of the newest save started

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(
    self,
    step: int,
    state: Any,
    data_state: Mapping[str, Any] | None,
    meta: Mapping[str, Any] | None = None,
    *,
    wait: bool = False,
  ) -> None:
    """Starts saving `state` at `step` (in the background unless `wait`)."""
    self._probe(step)
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(dict(data_state or {})),
      meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))),
    )
    self._step = int(step)
    with self._writing(step):
      _in_daemon_thread(lambda: self.manager.save(int(step), args=args, force=True))
    if wait:
      self.wait()

  def wait(self) -> None:
    """Waits for the background save; raises CheckpointWriteError if it failed."""
    with self._writing(self._step):
      self.manager.wait_until_finished()

  def check(self) -> None:
    """Raises CheckpointWriteError if a background save failed (cheap: does not wait)."""
    if self.failed is not None:
      raise self.failed
    if not self.manager.is_saving_in_progress():
      self.wait()  # finished: returns at once, or raises its error

  def _probe(self, step: int) -> None:
    probe = self.directory / f".write-probe-{os.getpid()}"
    try:
      probe.mkdir(exist_ok=True)
      (probe / "probe").write_bytes(b"ok")
      (probe / "probe").unlink()
      probe.rmdir()
    except OSError as e:
      self._fail(step, e)

  @contextlib.contextmanager
  def _writing(self, step: int | None):
    if self.failed is not None:
      raise self.failed
    try:
      yield
    except CheckpointWriteError:
      raise
    except Exception as e:  # noqa: BLE001  orbax wraps OS errors in its own and in ValueErrors
      self._fail(step, e)

  def _fail(self, step: int | None, error: BaseException) -> None:
    what = f"checkpoint step {step}" if step is not None else "a checkpoint"
    self.failed = CheckpointWriteError(
      f"{what} could not be written to {self.directory}: {_os_error(error)}"
    )
    raise self.failed from error

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
    """(step, state, data state, meta) of the newest readable checkpoint; None if there is none.

    Unreadable steps are logged and deleted so that the run, going on from an
    older step, can save that step number again.
    """
    steps = self.steps()
    if steps:
      _quiet_closed_loop_callbacks()
    errors = []
    for step in reversed(steps):
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
          ),
        )
        _check_complete(restored["state"], abstract_state)
      except Exception as e:  # noqa: BLE001  any failure to read means "not usable"
        errors.append((step, short_reason(e)))
        self._discard(step)
        continue
      for bad, reason in errors:  # when none is readable, the CheckpointError alone says it
        logger.warning(
          "checkpoint step %d in %s is unreadable (%s); went on from step %d",
          bad,
          self.directory,
          reason,
          step,
        )
      return step, restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {})
    if steps:
      reasons = "; ".join(f"step {bad}: {reason}" for bad, reason in errors)
      raise CheckpointError(
        f"none of the checkpoints in {self.directory} could be read "
        f"({reasons}); each was removed: the same command now starts from "
        "step 0"
      )
    return None

  def _discard(self, step: int) -> None:
    try:
      self.manager.delete(step)
    except Exception as e:  # noqa: BLE001  leaving it is harmless but noisy
      logger.warning("could not delete unreadable checkpoint step %d: %s", step, e)
    self.manager.reload()

  def close(self) -> None:
    if self.failed is not None:
      # Reported already; orbax's close would wait on the failed save again.
      return
    try:
      self.wait()
    finally:
      self.manager.close()


def _in_daemon_thread(fn) -> None:
  """Runs `fn` in a daemon thread and waits for it; its error is raised here.

  Threads take their daemon flag from the thread that starts them.
  """
  error: list[BaseException] = []

  def run() -> None:
    try:
      fn()
    except BaseException as e:  # noqa: BLE001  re-raised in the caller
      error.append(e)

  thread = threading.Thread(target=run, name="ablax-checkpoint-save", daemon=True)
  thread.start()
  thread.join()
  if error:
    raise error[0]


def _os_error(error: BaseException) -> str:
  """The OS error under orbax's wrappers (the most useful line), else the error itself."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and not isinstance(seen, CheckpointWriteError):
      return f"{type(seen).__name__}: {seen}"
    seen = seen.__cause__ or seen.__context__
  text = str(error).splitlines()[0][:500] if str(error) else ""
  return f"{type(error).__name__}: {text}"


def _check_complete(state: Any, abstract: Any) -> None:
  """Every array is there with the expected shape (orbax may fill missing ones silently)."""
  got = jax.tree.leaves(state)
  want = jax.tree.leaves(abstract)
  if len(got) != len(want):
    raise CheckpointError(f"{len(got)} arrays restored, {len(want)} expected")
  for g, w in zip(got, want):
    if tuple(g.shape) != tuple(w.shape):
      raise CheckpointError(f"array of shape {g.shape} restored, {w.shape} expected")


# -- what a failed restore says ---------------------------------------------------------

_SPEC = re.compile(r"\s*\[(tensorstore_spec|source locations)[^=]*=.*$", re.S)
_STATUS = re.compile(r"^([A-Z_]+): ")


def short_reason(error: BaseException) -> str:
  """One short line for a failed read: TensorStore's nested message cut to its code and cause.

  TensorStore says `OUT_OF_RANGE: Error opening "zarr" driver: Error reading ...:
  Requested byte range [0, 3084) is not valid for value of size 100
  [tensorstore_spec='{...}']`, a page per array; the code and the innermost
  clause name the fault.
  """
  text = _SPEC.sub("", " ".join(str(error).split()))
  status = _STATUS.match(text)
  if status:
    text = f"{status.group(1)}: {text.rsplit(': ', 1)[-1]}"
  text = text if len(text) <= 160 else text[:157] + "..."
  return f"{type(error).__name__}: {text}"


_quieted = False


def _quiet_closed_loop_callbacks() -> None:
  """Drops the 'Event loop is closed' reports TensorStore leaves after a failed restore.

  Orbax gives up on the first unreadable array and closes its event loop; the
  reads still in flight then finish into the closed loop, and Python prints each
  as an unraisable RuntimeError with its traceback: dozens for one bad step.
  Those reads belong to a checkpoint already judged unreadable, so nothing is
  lost. Every other unraisable error still reaches the previous hook.
  """
  global _quieted
  if _quieted:
    return
  _quieted = True
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    if (
      isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == "Event loop is closed"
    ):
      return
    previous(unraisable)

  sys.unraisablehook = hook
