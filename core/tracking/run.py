"""One MLflow run per training run, logged without ever stalling training.

`RunTracker` creates (or resumes) the run up front, where a store that cannot
be written fails the launch immediately rather than hours later. After that
every call only enqueues: a background thread batches records into
`MlflowClient.log_batch` calls. When the store is unreachable (server down,
sqlite locked by other writers) the records go, in order, to a local JSON-lines
spool (core/tracking/spool.py), and the thread replays the spool when the store
answers again. MLflow's own HTTP retries (7 retries over minutes by default)
would hide an outage inside one call, so for HTTP stores the tracker bounds
them unless the user set MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Mapping

from core.tracking import schema, spool
from core.tracking.store import (MAX_METRICS_PER_BATCH, MAX_PARAM_VALUE,
                                  MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VALUE, TrackingStoreError,
                                  bound_http_retries, clean_key, ensure_experiment, is_transient,
                                  sqlite_init_lock, truncate)

logger = logging.getLogger(__name__)

STATUSES = ("FINISHED", "FAILED", "KILLED")
ERROR_TAG = schema.ERROR



_MAX_ITEMS_PER_ROUND = 100_000
_STOP = object()
_WAKE = object()  # flush(): replay now rather than at the next retry interval


class RunTracker:
  """An MLflow run that logs asynchronously and survives store outages.

  Usage:
    with RunTracker(uri, "llama-ablations", run_name="gqa-8", spool_dir=workdir / "spool") as t:
      t.log_params(flat_config)
      for step in ...:
        t.log_metrics({"train/loss": loss}, step=step)
  On an exception inside the block the run is marked FAILED with the traceback.
  """

  def __init__(self, tracking_uri: str | None = None, experiment: str = "Default",
               run_name: str | None = None, run_id: str | None = None,
               spool_dir: str | os.PathLike | None = None,
               tags: Mapping[str, Any] | None = None, *,
               retry_interval_s: float = 10.0, http_timeout_s: int = 10,
               http_max_retries: int = 0, start_timeout_s: float = 120.0,
               end_timeout_s: float = 60.0, batch_interval_s: float = 1.0,
               system_metrics_s: float | None = None):
    """Configures the run; nothing is contacted before `start()`.

    Args:
      tracking_uri: any MLflow tracking URI; None means MLFLOW_TRACKING_URI
        (the caller normally passes `sqlite:///<workdir>/mlflow.db`).
      experiment: experiment name, created if missing.
      run_name: display name of a new run.
      run_id: resume this run (same MLflow run, status set back to RUNNING).
      spool_dir: where records wait while the store is unreachable; keep it in
        the run's workdir so a restarted run finds and replays it. None: a
        temporary directory.
      tags: tags set at creation.
      retry_interval_s: seconds between replay attempts while unreachable.
      http_timeout_s, http_max_retries: bounds on MLflow's HTTP requests
        (applied unless MLFLOW_HTTP_REQUEST_* are set).
      start_timeout_s: how long `start()` retries a locked or busy store.
      end_timeout_s: how long `end()` waits for queued records.
      batch_interval_s: the writer sends what accumulated at most this often
        (`flush()` and `end()` send at once).
      system_metrics_s: sample MLflow's system metrics (CPU, memory, disk,
        network; GPU with nvidia-ml-py) every this many seconds; None = off.
        MLflow starts its monitor by itself only for fluent runs, so it is
        started here; it stops for good at its first store error, so an
        unreachable store costs those samples, never the run.
    """
    self.tracking_uri = tracking_uri
    self.experiment = experiment
    self.system_metrics_s = system_metrics_s
    self._monitor = None
    self.run_name = run_name
    self.run_id = run_id
    self.spool_dir = Path(spool_dir) if spool_dir is not None else None
    self.tags = {k: v for k, v in (tags or {}).items()}
    self.retry_interval_s = retry_interval_s
    self.http_timeout_s = http_timeout_s
    self.http_max_retries = http_max_retries
    self.start_timeout_s = start_timeout_s
    self.end_timeout_s = end_timeout_s
    self.batch_interval_s = batch_interval_s
    self._urgent = threading.Event()
    self._client = None
    self._queue: queue.Queue = queue.Queue()
    self._thread: threading.Thread | None = None
    self._cond = threading.Condition()
    self._enqueued = 0
    self._processed = 0
    self._spooled = False  # True while the spool file holds undelivered records
    self._last_attempt = 0.0
    self._ended = False
    self.delivered_batches = 0  # for tests and diagnostics
    self.writer_cpu_s = 0.0  # CPU time the writer thread used (benchmarks)

  # ------------------------------------------------------------------ start

  def start(self) -> str:
    """Creates or resumes the run and starts the writer; returns the run id.

    Raises:
      TrackingStoreError: the store or the spool directory cannot be written.
    """
    if self._thread is not None:
      return self.run_id
    import mlflow
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    self.tracking_uri = self.tracking_uri or mlflow.get_tracking_uri()
    bound_http_retries(self.tracking_uri, self.http_timeout_s, self.http_max_retries)
    self._prepare_spool_dir()
    with sqlite_init_lock(self.tracking_uri):
      self._retry_transient(self._open_run, "open the run")
    # Records left by an earlier process of this run go first, while the
    # store is known to be reachable, so the history stays in order.
    if spool.pending(self.spool_dir, self.run_id):
      try:
        n = spool.replay(self.spool_dir, self.run_id, self._send_or_reject)
        logger.info("replayed %d spooled records of run %s", n, self.run_id)
      except Exception as e:  # noqa: BLE001  transient: the writer retries later
        logger.warning("spool replay deferred: %s", e)
        self._spooled = True
        self._last_attempt = time.monotonic()
    self._thread = threading.Thread(target=self._writer, name="ablax-tracking", daemon=True)
    self._thread.start()
    if self.system_metrics_s:
      self._start_monitor()
    # The writer is a daemon thread: without this, records still queued when
    # the interpreter exits (a forgotten end(), sys.exit outside the `with`)
    # would be lost rather than delivered or spooled.
    atexit.register(self._at_exit)
    return self.run_id

  def _start_monitor(self) -> None:
    try:
      from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
      self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.system_metrics_s,
                                           tracking_uri=self.tracking_uri, resume_logging=True)
      self._monitor.start()
    except Exception as e:  # noqa: BLE001  system metrics are a convenience
      logger.warning("MLflow system metrics are off: %s", e)
      self._monitor = None

  def _at_exit(self) -> None:
    if not self._ended:
      self.end("KILLED", error="the process exited without RunTracker.end()")

  def _prepare_spool_dir(self) -> None:
    if self.spool_dir is None:
      self.spool_dir = Path(tempfile.mkdtemp(prefix="ablax-spool-"))
    try:
      self.spool_dir.mkdir(parents=True, exist_ok=True)
      probe = self.spool_dir / f".probe-{os.getpid()}"
      probe.write_text("ok")
      probe.unlink()
    except OSError as e:
      raise TrackingStoreError(f"spool directory {self.spool_dir} is not writable: {e}") from e

  def _retry_transient(self, fn, what: str):
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
            f"(experiment {self.experiment!r}): {type(e).__name__}: {str(e)[:1000]}") from e

  def _open_run(self) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    client = self._client = MlflowClient(self.tracking_uri)
    resumed = bool(self.run_id)
    experiment_id = ensure_experiment(client, self.tracking_uri, self.experiment)
    tags = {clean_key(k): truncate(v, MAX_TAG_VALUE) for k, v in self.tags.items()}
    if self.run_id:
      try:
        run = client.get_run(self.run_id)
      except MlflowException as e:
        if e.get_http_status_code() == 404 or "not found" in str(e).lower():
          raise TrackingStoreError(f"cannot resume run {self.run_id}: not found in "
                                   f"{self.tracking_uri!r}") from e
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
    start_info = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
               "spool_dir": str(self.spool_dir), "resumed": resumed}
    client.log_text(self.run_id, json.dumps(start_info, indent=1),
                    f"ablax/starts/{int(time.time() * 1000)}-{os.getpid()}.json")

  # ---------------------------------------------------------------- logging

  def _put(self, item: tuple) -> None:
    if self._thread is None:
      raise RuntimeError("RunTracker: call start() (or use it as a context manager) first")
    if self._ended:
      raise RuntimeError("RunTracker: the run has ended")
    with self._cond:
      self._enqueued += 1
    self._queue.put(item)

  def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
    """Enqueues metrics at `step`; never blocks on the store.

    Values may be Python or NumPy numbers or JAX scalars; they are converted in
    the writer thread, so a device value does not block the training step.
    """
    self._put(("metrics", dict(metrics), int(step), int(time.time() * 1000)))

  def log_params(self, params: Mapping[str, Any]) -> None:
    """Values longer than MLflow's 6000 characters are truncated (log the full text as an artifact)."""
    self._put(("params", {clean_key(k): truncate(v, MAX_PARAM_VALUE) for k, v in params.items()}))

  def set_tags(self, tags: Mapping[str, Any]) -> None:
    self._put(("tags", {clean_key(k): truncate(v, MAX_TAG_VALUE) for k, v in tags.items()}))

  def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Logs a file or directory; it is copied first, so the caller may change it afterwards."""
    src = Path(local_path)
    if not src.exists():
      raise FileNotFoundError(f"artifact {src} does not exist")
    staged = self._stage_dir() / src.name
    if src.is_dir():
      shutil.copytree(src, staged)
    else:
      shutil.copy2(src, staged)
    self._put(("artifact", str(staged), artifact_path))

  def log_inputs(self, datasets: list[dict[str, str]]) -> None:
    """Logs datasets as the run's inputs: [{'name', 'digest', 'source', 'context'}, ...].

    MLflow shows them in the run's Datasets column; `datasets.digest` filters find
    every run that read a given data set. Spooled like every other record.
    """
    self._put(("inputs", list(datasets)))

  def log_text(self, text: str, artifact_file: str) -> None:
    staged = self._stage_dir() / Path(artifact_file).name
    staged.write_text(text, encoding="utf-8")
    parent = str(Path(artifact_file).parent)
    self._put(("artifact", str(staged), None if parent in ("", ".") else parent))

  def log_dict(self, obj: Any, artifact_file: str) -> None:
    if artifact_file.endswith((".yaml", ".yml")):
      import yaml
      text = yaml.safe_dump(obj, sort_keys=False)
    else:
      text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    self.log_text(text, artifact_file)

  def _stage_dir(self) -> Path:
    if self.spool_dir is None:
      raise RuntimeError("RunTracker: call start() first")
    path = self.spool_dir / "staged" / uuid.uuid4().hex
    path.mkdir(parents=True)
    return path

  # -------------------------------------------------------------- the writer

  def _writer(self) -> None:
    stop = False
    while not stop:
      cpu0 = time.thread_time()
      items = []
      try:
        items.append(self._queue.get(timeout=min(0.5, self.retry_interval_s)))
      except queue.Empty:
        pass
      if items and items[0] is not _STOP and items[0] is not _WAKE:
        # Let records pile up for a while: one store transaction per interval
        # rather than per step keeps the writer's CPU and lock time small.
        self._urgent.wait(self.batch_interval_s)
      self._urgent.clear()
      try:
        while len(items) < _MAX_ITEMS_PER_ROUND:
          items.append(self._queue.get_nowait())
      except queue.Empty:
        pass
      stop = any(i is _STOP for i in items)
      wake = any(i is _WAKE for i in items)
      try:
        records = self._records(items)
        if records:
          self._deliver(records)
        if self._spooled and (wake or stop or
                              time.monotonic() - self._last_attempt >= self.retry_interval_s):
          self._try_replay()
      except Exception:  # noqa: BLE001  the writer must never die silently
        logger.exception("tracking writer error")
      finally:
        self.writer_cpu_s += time.thread_time() - cpu0
        with self._cond:
          self._processed += len(items)
          self._cond.notify_all()

  def _records(self, items: list) -> list[dict[str, Any]]:
    """Queue items -> spool-format records: consecutive logs merged into batches.

    A batch respects MLflow's limits: 1000 entities in all, of which at most
    100 params and 100 tags.
    """
    records: list[dict[str, Any]] = []
    batch = None

    def room(kind: str) -> bool:
      total = sum(len(batch[k]) for k in ("metrics", "params", "tags"))
      return total < MAX_METRICS_PER_BATCH and (
          kind == "metrics" or len(batch[kind]) < MAX_PARAMS_TAGS_PER_BATCH)

    def add(kind: str, entry) -> None:
      nonlocal batch
      if batch is None or not room(kind):
        batch = {"kind": "batch", "metrics": [], "params": {}, "tags": {}}
        records.append(batch)
      if kind == "metrics":
        batch["metrics"].append(entry)
      else:
        batch[kind][entry[0]] = entry[1]

    for item in items:
      if item is _STOP or item is _WAKE:
        continue
      kind = item[0]
      if kind == "artifact":
        batch = None
        records.append({"kind": "artifact", "local_path": item[1], "artifact_path": item[2]})
      elif kind == "inputs":
        batch = None
        records.append({"kind": "inputs", "datasets": item[1]})
      elif kind == "metrics":
        _, metrics, step, timestamp = item
        for key, value in metrics.items():
          try:
            value = float(value)
          except (TypeError, ValueError):
            logger.warning("metric %r=%r is not a number; dropped", key, value)
            continue
          add("metrics", [clean_key(key), value, timestamp, step])
      else:
        for key, value in item[1].items():
          add(kind, (key, value))
    return records

  def _deliver(self, records: list[dict[str, Any]]) -> None:
    if self._spooled:  # keep order: nothing overtakes the spool
      spool.append(self.spool_dir, self.run_id, records)
      return
    for i, record in enumerate(records):
      try:
        self._send_or_reject(record)
      except Exception as e:  # noqa: BLE001  transient (permanent ones are rejected)
        logger.warning("tracking store unreachable (%s: %s); spooling to %s",
                       type(e).__name__, str(e)[:200], self.spool_dir)
        spool.append(self.spool_dir, self.run_id, records[i:])
        self._spooled = True
        self._last_attempt = time.monotonic()
        return

  def _try_replay(self) -> None:
    self._last_attempt = time.monotonic()
    try:
      n = spool.replay(self.spool_dir, self.run_id, self._send_or_reject)
    except Exception as e:  # noqa: BLE001  still unreachable
      logger.debug("replay failed: %s", e)
      return
    self._spooled = False
    logger.warning("tracking store reachable again; replayed %d spooled records", n)

  def _send_or_reject(self, record: dict[str, Any]) -> None:
    """Sends one record; a permanent rejection is set aside, a transient error raises."""
    try:
      self._send(record)
    except Exception as e:  # noqa: BLE001
      if is_transient(e):
        raise
      logger.error("tracking store rejected a record (%s); kept in %s", e, self._rejected_path())
      with open(self._rejected_path(), "a", encoding="utf-8") as f:
        f.write(json.dumps({"error": str(e)[:2000], "record": spool.encode_record(record)}) + "\n")

  def _rejected_path(self) -> Path:
    return self.spool_dir / f"{self.run_id}.rejected.jsonl"

  def _send(self, record: dict[str, Any]) -> None:
    from mlflow.entities import Metric, Param, RunTag
    kind = record["kind"]
    if kind == "batch":
      self._client.log_batch(
          self.run_id,
          metrics=[Metric(k, v, t, s) for k, v, t, s in record["metrics"]],
          params=[Param(k, str(v)) for k, v in record["params"].items()],
          tags=[RunTag(k, str(v)) for k, v in record["tags"].items()],
          synchronous=True)
      self.delivered_batches += 1
    elif kind == "artifact":
      path = Path(record["local_path"])
      if not path.exists():
        logger.warning("staged artifact %s vanished; skipped", path)
        return
      if path.is_dir():
        self._client.log_artifacts(self.run_id, str(path), record["artifact_path"])
      else:
        self._client.log_artifact(self.run_id, str(path), record["artifact_path"])
      staged_root = (self.spool_dir / "staged").resolve()
      if staged_root in path.resolve().parents:
        shutil.rmtree(path.parent, ignore_errors=True)
    elif kind == "inputs":
      from mlflow.data.code_dataset_source import CodeDatasetSource
      from mlflow.data.meta_dataset import MetaDataset
      from mlflow.entities import DatasetInput, InputTag
      inputs = [DatasetInput(
          MetaDataset(CodeDatasetSource({"source": d["source"]}), name=d["name"],
                      digest=d["digest"])._to_mlflow_entity(),
          tags=[InputTag("mlflow.data.context", d.get("context", "train"))])
          for d in record["datasets"]]
      self._client.log_inputs(self.run_id, datasets=inputs)
    elif kind == "terminate":
      self._client.set_terminated(self.run_id, record["status"], record["end_time"])
    else:
      raise ValueError(f"unknown spool record kind {kind!r}")

  # ------------------------------------------------------------ flush, end

  @property
  def pending_spool(self) -> int:
    """Records waiting in the spool file (0 when everything reached the store)."""
    return spool.pending(self.spool_dir, self.run_id) if self.run_id else 0

  def flush(self, timeout: float | None = 30.0) -> bool:
    """Waits until everything logged so far was handled; True when all of it reached the store.

    While the store is unreachable this attempts one replay and returns False
    (the records stay safe in the spool); it never waits past `timeout`.
    """
    if self._thread is None or not self._thread.is_alive():
      return not self._spooled
    with self._cond:
      self._enqueued += 1
      target = self._enqueued
    self._queue.put(_WAKE)
    self._urgent.set()
    deadline = None if timeout is None else time.monotonic() + timeout
    with self._cond:
      while self._processed < target:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
          return False
        self._cond.wait(remaining)
    return not self._spooled

  def end(self, status: str = "FINISHED", error: str | None = None) -> bool:
    """Flushes, replays the spool, sets the final status; True when the store has it all.

    With the store still unreachable the status is spooled with the rest
    (replayed by the next `start()` of this run or by `replay_spool`).
    """
    if self._ended or self._thread is None:
      return True
    status = status.upper()
    if status not in STATUSES:
      raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    atexit.unregister(self._at_exit)
    if self._monitor is not None:
      try:
        self._monitor.finish()
      except Exception as e:  # noqa: BLE001
        logger.info("system metrics monitor: %s", e)
      self._monitor = None
    if error:
      self.set_tags({ERROR_TAG: error[-MAX_TAG_VALUE:]})
      self.log_text(error, "error.txt")
    self.flush(self.end_timeout_s)
    self._ended = True
    with self._cond:
      self._enqueued += 1
    self._queue.put(_STOP)
    self._urgent.set()
    self._thread.join(self.end_timeout_s)
    terminate = {"kind": "terminate", "status": status, "end_time": int(time.time() * 1000)}
    if self._thread.is_alive():
      logger.error("tracking writer did not finish in %ss; status %s not recorded",
                   self.end_timeout_s, status)
      return False
    if not self._spooled:
      try:
        self._send_or_reject(terminate)
        return True
      except Exception:  # noqa: BLE001  fall through to the spool
        pass
    spool.append(self.spool_dir, self.run_id, [terminate])
    try:
      spool.replay(self.spool_dir, self.run_id, self._send_or_reject)
      return True
    except Exception as e:  # noqa: BLE001
      logger.error("tracking store unreachable at the end of run %s (%s); %d records kept in %s; "
                   "deliver them with `ablax tracking sync <workdir>` (replay_spool)", self.run_id, e,
                   self.pending_spool, spool.spool_path(self.spool_dir, self.run_id))
      return False

  def __enter__(self) -> "RunTracker":
    self.start()
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    if exc_type is None:
      self.end("FINISHED")
    elif issubclass(exc_type, KeyboardInterrupt) or (
        issubclass(exc_type, SystemExit) and exc.code not in (0, None)):
      self.end("KILLED", error="".join(traceback.format_exception(exc_type, exc, tb)))
    elif issubclass(exc_type, SystemExit):
      self.end("FINISHED")
    else:
      self.end("FAILED", error="".join(traceback.format_exception(exc_type, exc, tb)))
    return False


def replay_spool(tracking_uri: str, spool_dir: str | os.PathLike, run_id: str) -> int:
  """Sends a run's spooled records (e.g. after its process ended during an outage)."""
  from mlflow.tracking import MlflowClient
  tracker = RunTracker(tracking_uri, run_id=run_id, spool_dir=spool_dir)
  tracker.tracking_uri = tracking_uri
  tracker._client = MlflowClient(tracking_uri)
  return spool.replay(spool_dir, run_id, tracker._send_or_reject)


class NullTracker:
  """RunTracker's interface, recording nothing (non-zero processes, --no_tracking)."""

  run_id = None
  pending_spool = 0

  def start(self) -> None:
    return None

  def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
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
