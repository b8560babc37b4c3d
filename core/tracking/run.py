"""One MLflow run per training run, recorded in the workdir first, never stalling training.

`RunTracker` creates (or resumes) the run up front, where a store that cannot
be written fails the launch immediately rather than hours later. After that
every call writes to the workdir only: metrics to its journal
(core/tracking/journal.py; a thread of its own writes it, so logging a step
costs the training loop a queue put), params, tags, inputs, artifacts and the
final status to its local record (core/tracking/local.py). A background thread
uploads what the store does not have yet (core/tracking/sync.py) once per
`batch_interval_s`; while the store is unreachable the persisted offset simply
does not advance, and the thread tries again every `retry_interval_s`. What
is still waiting when the process ends goes with the next start of the run or
`ablax tracking sync WORKDIR`. MLflow's own HTTP retries (7 over minutes by
default) would hide an outage inside one call, so for HTTP stores the tracker
bounds them unless the user set MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

from core.tracking import journal, local, schema, sync
from core.tracking.store import (
  MAX_PARAM_VALUE,
  MAX_TAG_VALUE,
  TrackingStoreError,
  bound_http_retries,
  clean_key,
  ensure_experiment,
  is_transient,
  public_uri,
  sqlite_init_lock,
  truncate,
)

logger = logging.getLogger(__name__)

STATUSES = local.STATUSES
ERROR_TAG = schema.ERROR


class RunTracker:
  """An MLflow run fed from its workdir, so a store outage costs nothing but delay.

  Usage:
    with RunTracker(uri, "llama-ablations", run_name="gqa-8", workdir=workdir) as t:
      t.log_params(flat_config)
      for step in ...:
        t.log_metrics({"train/loss": loss}, step=step)
  On an exception inside the block the run is marked FAILED with the traceback.
  """

  def __init__(
    self,
    tracking_uri: str | None = None,
    experiment: str = "Default",
    run_name: str | None = None,
    run_id: str | None = None,
    workdir: str | os.PathLike | None = None,
    tags: Mapping[str, Any] | None = None,
    *,
    retry_interval_s: float = 10.0,
    http_timeout_s: int = 10,
    http_max_retries: int = 0,
    start_timeout_s: float = 120.0,
    end_timeout_s: float = 60.0,
    batch_interval_s: float = 1.0,
    system_metrics_s: float | None = None,
  ):
    """Configures the run; nothing is contacted or written before `start()`.

    Args:
      tracking_uri: any MLflow tracking URI; None means MLFLOW_TRACKING_URI.
      experiment: experiment name, created if missing.
      run_name: display name of a new run.
      run_id: resume this run (same MLflow run, status set back to RUNNING).
      workdir: the run's directory, which holds its record (journal, run.json,
        record/) and what of it reached the store. None: a temporary directory.
      tags: tags set at creation.
      retry_interval_s: seconds between uploads while the store is unreachable.
      http_timeout_s, http_max_retries: bounds on MLflow's HTTP requests
        (applied unless MLFLOW_HTTP_REQUEST_* are set).
      start_timeout_s: how long `start()` retries a locked or busy store.
      end_timeout_s: how long `end()` waits for the last upload.
      batch_interval_s: the thread uploads what accumulated at most this often
        (`flush()` and `end()` upload at once).
      system_metrics_s: sample MLflow's system metrics (CPU, memory, disk,
        network; GPU with nvidia-ml-py) every this many seconds; None = off.
        MLflow starts its monitor by itself only for fluent runs, so it is
        started here; it logs to the store directly (nothing of it is in the
        journal) and stops for good at its first store error.
    """
    self.tracking_uri = tracking_uri
    self.experiment = experiment
    self.run_name = run_name
    self.run_id = run_id
    self.workdir = Path(workdir) if workdir is not None else None
    self.tags = dict(tags or {})
    self.retry_interval_s = retry_interval_s
    self.http_timeout_s = http_timeout_s
    self.http_max_retries = http_max_retries
    self.start_timeout_s = start_timeout_s
    self.end_timeout_s = end_timeout_s
    self.batch_interval_s = batch_interval_s
    self.system_metrics_s = system_metrics_s
    self.journal: journal.Journal | None = None
    self._journal_writer: journal.Writer | None = None
    self.syncer: sync.Syncer | None = None
    self.reachable = True  # the last upload reached the store
    self.writer_cpu_s = 0.0  # CPU time the upload thread used (benchmarks)
    self._monitor = None
    self._thread: threading.Thread | None = None
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._done = threading.Condition()
    self._rounds = 0  # uploads finished, whether or not they reached the store
    self._full = False  # the next round uploads everything (flush)
    self._ended = False

  # ------------------------------------------------------------------ start

  def start(self) -> str:
    """Creates or resumes the run and starts the upload thread; returns the run id.

    Raises:
      TrackingStoreError: the store or the workdir cannot be written.
    """
    if self._thread is not None:
      return self.run_id
    import mlflow  # pylint: disable=g-import-not-at-top

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    self.tracking_uri = self.tracking_uri or mlflow.get_tracking_uri()
    bound_http_retries(self.tracking_uri, self.http_timeout_s, self.http_max_retries)
    self._open_workdir()
    with sqlite_init_lock(self.tracking_uri):
      client = self._retry_transient(self._open_run, "open the run")
    # This process's record starts RUNNING; the status the last one ended with was sent, or
    # its record goes now, before anything of this one.
    local.update_run_file(
      self.workdir,
      **{
        schema.RUN_ID_KEY: self.run_id,
        schema.TRACKING_URI_KEY: public_uri(self.tracking_uri),
        schema.EXPERIMENT_KEY: self.experiment,
        local.STATUS: None,
        local.END_TIME: None,
      },
    )
    self.syncer = sync.Syncer(self.workdir, self.run_id, client)
    self._journal_writer = journal.Writer(self.journal)
    self._thread = threading.Thread(target=self._uploader, name="ablax-tracking", daemon=True)
    self._thread.start()
    if self.system_metrics_s:
      self._start_monitor()
    # The thread is a daemon: without this a forgotten end() (sys.exit outside the `with`)
    # would leave the run RUNNING in the store rather than KILLED with all its records.
    atexit.register(self._at_exit)
    return self.run_id

  def _open_workdir(self) -> None:
    if self.workdir is None:
      self.workdir = Path(tempfile.mkdtemp(prefix="ablax-run-"))
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
      probe = self.workdir / f".probe-{os.getpid()}"
      probe.write_text("ok")
      probe.unlink()
    except OSError as e:
      raise TrackingStoreError(f"the run's workdir {self.workdir} is not writable: {e}") from e
    self.journal = journal.Journal(self.workdir)

  def _start_monitor(self) -> None:
    try:
      from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # pylint: disable=g-import-not-at-top

      self._monitor = SystemMetricsMonitor(
        self.run_id,
        sampling_interval=self.system_metrics_s,
        tracking_uri=self.tracking_uri,
        resume_logging=True,
      )
      self._monitor.start()
    except Exception as e:  # noqa: BLE001  system metrics are a convenience
      logger.warning("MLflow system metrics are off: %s", e)
      self._monitor = None

  def _at_exit(self) -> None:
    if not self._ended:
      self.end("KILLED", error="the process exited without RunTracker.end()")

  def _retry_transient(self, fn: Callable[[], Any], what: str):
    """Runs `fn`, retrying only contention that clears by itself; anything else fails now."""
    deadline = time.monotonic() + self.start_timeout_s
    delay = 0.2
    while True:
      try:
        return fn()
      except TrackingStoreError:
        raise
      except Exception as e:  # noqa: BLE001  classified below
        # Many processes opening one new sqlite store race on its schema
        # ('already exists') and on its write lock; both clear on retry. An
        # unreachable server or an unwritable file does not, so it fails now.
        text = str(e).lower()
        racing = any(s in text for s in ("already exists", "database is locked", "busy"))
        if racing and time.monotonic() + delay < deadline:
          time.sleep(delay)
          delay = min(delay * 2, 5.0)
          continue
        raise TrackingStoreError(
          f"cannot {what} in the MLflow store {self.tracking_uri!r} "
          f"(experiment {self.experiment!r}): {type(e).__name__}: {str(e)[:1000]}"
        ) from e

  def _open_run(self):
    from mlflow.exceptions import MlflowException  # pylint: disable=g-import-not-at-top
    from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top

    client = MlflowClient(self.tracking_uri)
    resumed = bool(self.run_id)
    experiment_id = ensure_experiment(client, self.tracking_uri, self.experiment)
    tags = {clean_key(k): truncate(v, MAX_TAG_VALUE) for k, v in self.tags.items()}
    if self.run_id:
      try:
        run = client.get_run(self.run_id)
      except MlflowException as e:
        if e.get_http_status_code() == 404 or "not found" in str(e).lower():
          raise TrackingStoreError(
            f"cannot resume run {self.run_id}: not found in {self.tracking_uri!r}"
          ) from e
        raise
      if run.info.status != "RUNNING":
        client.update_run(self.run_id, status="RUNNING")
      for key, value in tags.items():
        client.set_tag(self.run_id, key, value)
    else:
      from mlflow.tracking.context.registry import resolve_tags  # pylint: disable=g-import-not-at-top

      # MLflow's own context tags (user, source name and type, git commit), which fill
      # the UI's user and source columns; ours win where both name a key.
      run = client.create_run(experiment_id, tags=resolve_tags(tags), run_name=self.run_name)
      self.run_id = run.info.run_id
    # Writing an artifact proves the artifact store is writable too; the file
    # is the run's start log (one per start, so resumes are visible).
    start_info = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "time": time.time(),
      "workdir": str(self.workdir),
      "resumed": resumed,
    }
    client.log_text(
      self.run_id,
      json.dumps(start_info, indent=1),
      f"ablax/starts/{int(time.time() * 1000)}-{os.getpid()}.json",
    )
    return client

  # ---------------------------------------------------------------- logging

  def _check(self) -> None:
    if self._thread is None:
      raise RuntimeError("RunTracker: call start() (or use it as a context manager) first")
    if self._ended:
      raise RuntimeError("RunTracker: the run has ended")

  def resume(self, step: int, say: Callable[[str], None] = print) -> None:
    """Steps from `step` on are logged again: (metric, step) pairs already journaled are dropped
    and changed deterministic values reported (core.tracking.journal)."""
    self._check()
    self._journal_writer.drain()
    self.journal.resume(step, say)

  def log_metrics(self, metrics: Mapping[str, Any], step: int, **fields: Any) -> None:
    """Queues metrics at `step` for the journal; waits neither for the device nor the store.

    Values are Python, NumPy or JAX numbers, read by the journal's thread (a
    JAX scalar straight from the step costs no sync here); `fields` are
    journal-only (the ETA).
    """
    self._check()
    self._journal_writer.put(metrics, step, fields)

  def log_params(self, params: Mapping[str, Any]) -> None:
    """Values longer than MLflow's 6000 characters are truncated (log the full text as an artifact)."""
    self._check()
    local.update_run_file(
      self.workdir,
      **{local.PARAMS: {clean_key(k): truncate(v, MAX_PARAM_VALUE) for k, v in params.items()}},
    )
    self._wake.set()

  def set_tags(self, tags: Mapping[str, Any]) -> None:
    self._check()
    local.update_run_file(
      self.workdir,
      **{local.TAGS: {clean_key(k): truncate(v, MAX_TAG_VALUE) for k, v in tags.items()}},
    )
    self._wake.set()

  def log_inputs(self, datasets: list[dict[str, str]]) -> None:
    """Logs datasets as the run's inputs: [{'name', 'digest', 'source', 'context'}, ...].

    MLflow shows them in the run's Datasets column; `datasets.digest` filters find
    every run that read a given data set.
    """
    self._check()
    local.update_run_file(self.workdir, **{local.INPUTS: list(datasets)})

  def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Uploads a file or directory: the workdir's as it is when synced, another as it is now."""
    self._check()
    local.add_artifact(self.workdir, local_path, artifact_path)

  def log_text(self, text: str, artifact_file: str) -> None:
    self._check()
    local.write_text(self.workdir, text, artifact_file)

  def log_dict(self, obj: Any, artifact_file: str) -> None:
    if artifact_file.endswith((".yaml", ".yml")):
      import yaml  # pylint: disable=g-import-not-at-top

      text = yaml.safe_dump(obj, sort_keys=False)
    else:
      text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    self.log_text(text, artifact_file)

  # -------------------------------------------------------------- the upload

  def _uploader(self) -> None:
    last_try = -float("inf")
    while True:
      self._wake.wait(self.batch_interval_s)
      self._wake.clear()
      stop, full, self._full = self._stop.is_set(), self._full, False
      if full or stop or self.reachable or time.monotonic() - last_try >= self.retry_interval_s:
        last_try = time.monotonic()
        self._upload(everything=full or stop)
      with self._done:
        self._rounds += 1
        self._done.notify_all()
      if stop:
        return

  def _upload(self, everything: bool) -> None:
    cpu0 = time.thread_time()
    try:
      # In between, an artifact goes up once; one that changed since (metrics.jsonl of a
      # resumed run) waits for flush() or end() rather than going up every second.
      self.syncer.sync(changed_artifacts=everything)
      if not self.reachable:
        logger.warning("tracking store reachable again; run %s is up to date", self.run_id)
      self.reachable = True
    except Exception as e:  # noqa: BLE001  the thread must never die; the workdir keeps it all
      if self.reachable:
        logger.warning(
          "tracking store unreachable (%s: %s); the run's record waits in %s",
          type(e).__name__,
          str(e)[:200],
          self.workdir,
        )
      if not is_transient(e):
        logger.exception("tracking upload error")
      self.reachable = False
    finally:
      self.writer_cpu_s += time.thread_time() - cpu0

  @property
  def pending(self) -> int:
    """Records the store does not have yet, queued ones too (0 when it has everything)."""
    if self.syncer is None:
      return 0
    return self._journal_writer.queued + self.syncer.pending()

  def flush(self, timeout: float | None = 30.0) -> bool:
    """Uploads now and waits for it; True when the store has everything logged so far.

    While the store is unreachable this makes one attempt and returns False
    (the record is safe in the workdir); it never waits past `timeout`.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    if self._journal_writer is not None and not self._journal_writer.drain(timeout):
      return False
    if self._thread is None or not self._thread.is_alive():
      return self.pending == 0
    with self._done:
      target = self._rounds + 2  # a round under way may have started before the last log
    self._full = True  # everything, now, whatever the retry interval says
    self._wake.set()
    with self._done:
      while self._rounds < target:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
          return False
        self._wake.set()
        self._done.wait(remaining)
    return self.reachable and self.pending == 0

  def end(self, status: str = "FINISHED", error: str | None = None) -> bool:
    """Records the final status, uploads what waits; True when the store has it all.

    With the store unreachable everything stays in the workdir, for the next
    `start()` of this run or `ablax tracking sync WORKDIR`.
    """
    if self._ended or self._thread is None:
      return True
    status = status.upper()
    if status not in STATUSES:
      raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    atexit.unregister(self._at_exit)
    # Every queued step is in the journal before the status, which the store gets last.
    if not self._journal_writer.close(self.end_timeout_s):
      logger.error(
        "the journal's thread did not finish in %ss; the last steps may be missing from %s",
        self.end_timeout_s,
        self.journal.path,
      )
    if self._monitor is not None:
      try:
        self._monitor.finish()
      except Exception as e:  # noqa: BLE001
        logger.info("system metrics monitor: %s", e)
      self._monitor = None
    if error:
      self.set_tags({ERROR_TAG: error[-MAX_TAG_VALUE:]})
      self.log_text(error, "error.txt")
    local.end(self.workdir, status)
    self._ended = True
    self._stop.set()  # one last, full attempt, however recent the last failure
    self._wake.set()
    self._thread.join(self.end_timeout_s)
    if self._thread.is_alive():
      logger.error(
        "tracking upload did not finish in %ss; the record waits in %s",
        self.end_timeout_s,
        self.workdir,
      )
      return False
    if self.reachable and self.pending == 0:
      return True
    logger.error(
      "tracking store unreachable at the end of run %s; %d records wait in %s; "
      "deliver them with `ablax tracking sync %s`",
      self.run_id,
      self.pending,
      self.workdir,
      self.workdir,
    )
    return False

  def __enter__(self) -> "RunTracker":
    self.start()
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    if exc_type is None:
      self.end("FINISHED")
    elif issubclass(exc_type, KeyboardInterrupt) or (
      issubclass(exc_type, SystemExit) and exc.code not in (0, None)
    ):
      self.end("KILLED", error="".join(traceback.format_exception(exc_type, exc, tb)))
    elif issubclass(exc_type, SystemExit):
      self.end("FINISHED")
    else:
      self.end("FAILED", error="".join(traceback.format_exception(exc_type, exc, tb)))
    return False


class NullTracker:
  """RunTracker's interface, recording nothing (processes other than 0)."""

  run_id = None
  pending = 0

  def start(self) -> None:
    return None

  def resume(self, step: int, say: Callable[[str], None] = print) -> None:
    pass

  def log_metrics(self, metrics: Mapping[str, Any], step: int, **fields: Any) -> None:
    pass

  def log_params(self, params: Mapping[str, Any]) -> None:
    pass

  def set_tags(self, tags: Mapping[str, Any]) -> None:
    pass

  def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
    pass

  def log_inputs(self, datasets: list[dict[str, str]]) -> None:
    pass

  def log_text(self, text: str, artifact_file: str) -> None:
    pass

  def log_dict(self, obj: Any, artifact_file: str) -> None:
    pass

  def flush(self, timeout: float | None = 30.0) -> bool:
    return True

  def end(self, status: str = "FINISHED", error: str | None = None) -> bool:
    return True

  def __enter__(self) -> "NullTracker":
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    return False


class LocalTracker(NullTracker):
  """Process 0 of a run without a store (--no_tracking): its metrics go to the journal only."""

  def __init__(self, workdir: str | os.PathLike):
    self.journal = journal.Journal(workdir)
    self._journal_writer = journal.Writer(self.journal)

  def resume(self, step: int, say: Callable[[str], None] = print) -> None:
    self._journal_writer.drain()
    self.journal.resume(step, say)

  def log_metrics(self, metrics: Mapping[str, Any], step: int, **fields: Any) -> None:
    self._journal_writer.put(metrics, step, fields)

  def flush(self, timeout: float | None = 30.0) -> bool:
    return self._journal_writer.drain(timeout)

  def end(self, status: str = "FINISHED", error: str | None = None) -> bool:
    return self._journal_writer.close()
