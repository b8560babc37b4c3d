"""A sweep's trainer dies with the sweep: it stops (SIGTERM: checkpoint, exit) when the sweep is gone.

The sweep starts each child in its own session, so that Ctrl-C in the terminal
reaches only the sweep, which then stops its children in order (SIGTERM, wait,
checkpoint). But a sweep killed outright (kill -9, an OOM kill) sends nothing,
and its children would train on as orphans beside the trainers a rerun starts.
So the sweep names itself in ABLAX_PARENT_PID and each child watches it from a
thread: once the parent is gone (the child was reparented, or the pid no longer
exists, which also covers a wrapper script between them), the child sends
itself SIGTERM, which the trainer handles like any other.

Not prctl(PR_SET_PDEATHSIG): it needs a preexec_fn (which forces a plain fork of
the threaded, JAX-importing sweep), fires when the spawning *thread* ends rather
than the process, and does not reach through a wrapper command.
"""

from __future__ import annotations

import os
import signal
import threading
import time

ENV = "ABLAX_PARENT_PID"
INTERVAL_S = 1.0


def parent_alive(pid: int, original_ppid: int) -> bool:
  if os.getppid() != original_ppid:
    return False  # reparented: whoever started this process has ended
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  return True


def start(env: dict | None = None, interval_s: float = INTERVAL_S) -> threading.Thread | None:
  """Starts the watch when ABLAX_PARENT_PID is set; returns its thread (None otherwise)."""
  value = (os.environ if env is None else env).get(ENV)
  if not value:
    return None
  pid, original_ppid = int(value), os.getppid()

  def watch() -> None:
    while parent_alive(pid, original_ppid):
      time.sleep(interval_s)
    try:
      print(f"the sweep (pid {pid}) that started this run is gone; stopping", flush=True)
    except OSError:
      pass  # its output was a pipe to the parent
    os.kill(os.getpid(), signal.SIGTERM)

  thread = threading.Thread(target=watch, name="ablax-parent-watch", daemon=True)
  thread.start()
  return thread
