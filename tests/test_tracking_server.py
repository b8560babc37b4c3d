"""A real `mlflow server` on localhost, stopped and restarted while a tracker logs."""

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from core.tracking.run import RunTracker

_HTTP_VARS = (
  "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
  "MLFLOW_HTTP_REQUEST_TIMEOUT",
  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class MlflowServer:
  """`mlflow server` in its own process group, so stopping it stops its workers too."""

  def __init__(self, root: Path, port: int):
    self.root, self.port, self.proc = root, port, None
    self.uri = f"http://127.0.0.1:{port}"

  def start(self, timeout: float = 120.0) -> None:
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    # Background job runners are not needed and would outlive a plain kill.
    env = dict(
      os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true"
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(self.root / "server.log", "a")
    self.proc = subprocess.Popen(
      [
        str(mlflow_bin),
        "server",
        "--backend-store-uri",
        f"sqlite:///{self.root / 'server.db'}",
        "--artifacts-destination",
        str(self.root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(self.port),
        "--workers",
        "1",
      ],
      cwd=self.root,
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(
          f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}"
        )
      try:
        with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
          if r.status == 200:
            return
      except OSError:
        time.sleep(0.2)
    raise RuntimeError("mlflow server did not become healthy")

  def stop(self) -> None:
    if self.proc is None or self.proc.poll() is not None:
      return
    os.killpg(self.proc.pid, signal.SIGTERM)
    try:
      self.proc.wait(15)
    except subprocess.TimeoutExpired:
      os.killpg(self.proc.pid, signal.SIGKILL)
      self.proc.wait(5)


@pytest.fixture
def server(tmp_path):
  saved = {k: os.environ.get(k) for k in _HTTP_VARS}
  srv = MlflowServer(tmp_path, _free_port())
  srv.start()
  yield srv
  srv.stop()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def _wait(predicate, timeout: float) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.05)
  return predicate()


def test_server_stopped_and_restarted_mid_run(server, tmp_path):
  keys = ("train/loss", "train/lr", "perf/tokens_per_s")
  tracker = RunTracker(
    server.uri, "outage", run_name="r", workdir=tmp_path / "run", retry_interval_s=0.3
  )
  tracker.start()
  tracker.log_params({"ModelConfig.num_layers": 2})

  def log(step):
    tracker.log_metrics({k: step + i / 10 for i, k in enumerate(keys)}, step)

  for step in range(100):
    log(step)
  assert tracker.flush(60)

  server.stop()
  durations = []
  for step in range(100, 200):
    t0 = time.perf_counter()
    log(step)
    durations.append(time.perf_counter() - t0)
  # The uploader found the server gone and keeps the rest in the workdir; training was never told.
  assert _wait(lambda: not tracker.reachable and tracker.pending > 0, 30)
  tracker.set_tags({"during": "outage"})
  print(
    f"\nlog_metrics while the server is down: median "
    f"{statistics.median(durations) * 1e6:.0f} us, max {max(durations) * 1e6:.0f} us"
  )

  server.start()
  for step in range(200, 300):
    log(step)
  assert _wait(lambda: tracker.flush(5), 90)
  assert tracker.end() is True

  client = MlflowClient(server.uri)
  run = client.get_run(tracker.run_id)
  assert run.info.status == "FINISHED"
  assert run.data.tags["during"] == "outage"
  for i, key in enumerate(keys):
    history = client.get_metric_history(tracker.run_id, key)
    assert [m.step for m in history] == list(range(300)), key  # each once, in order
    assert [m.value for m in history] == [s + i / 10 for s in range(300)]
  assert tracker.pending == 0


@pytest.mark.slow  # ~20 s; test_tracking_run covers the same path with a simulated outage
def test_outage_at_the_end_keeps_the_records_for_a_later_sync(server, tmp_path):
  from core.tracking.sync import Syncer

  tracker = RunTracker(
    server.uri, "outage", workdir=tmp_path / "run", retry_interval_s=0.3, end_timeout_s=10
  )
  tracker.start()
  tracker.log_metrics({"loss": 1.0}, 0)
  assert tracker.flush(30)
  server.stop()
  tracker.log_metrics({"loss": 2.0}, 1)
  assert tracker.end("FINISHED") is False  # not lost: kept in the workdir with the final status
  assert tracker.pending >= 2
  server.start()
  client = MlflowClient(server.uri)
  assert Syncer(tmp_path / "run", tracker.run_id, client).sync() >= 2
  assert client.get_run(tracker.run_id).info.status == "FINISHED"
  assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [0, 1]
