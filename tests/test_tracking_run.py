"""RunTracker against a local sqlite store: the run record, failure, resume, bad stores, and the
workdir it uploads from (journal, offset)."""

import json
import math
import os
import shutil
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from core.tracking import journal, local, sync
from core.tracking.run import NullTracker, RunTracker, TrackingStoreError

_HTTP_VARS = (
  "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
  "MLFLOW_HTTP_REQUEST_TIMEOUT",
  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
)


@pytest.fixture(autouse=True)
def _restore_http_env(monkeypatch):
  # The tracker sets MLflow's HTTP bounds with setdefault; keep tests independent.
  for k in _HTTP_VARS:
    was = os.environ.get(k)
    monkeypatch.setenv(k, "")  # records the variable's state, which the teardown restores
    if was is None:
      monkeypatch.delenv(k)
    else:
      monkeypatch.setenv(k, was)


@pytest.fixture(scope="module")
def _template_db(tmp_path_factory):
  """A store with MLflow's schema already migrated (a few seconds each time otherwise)."""
  path = tmp_path_factory.mktemp("template") / "mlflow.db"
  MlflowClient(f"sqlite:///{path}").search_experiments()
  return path


@pytest.fixture(autouse=True)
def _migrated_store(_mlflow_store, _template_db):
  shutil.copyfile(_template_db, _mlflow_store[len("sqlite:///") :])


def _tracker(uri, tmp_path, **kw):
  kw.setdefault("workdir", tmp_path / "run")
  kw.setdefault("retry_interval_s", 0.2)
  return RunTracker(uri, kw.pop("experiment", "tests"), **kw)


def _steps(client, run_id, key):
  return [m.step for m in client.get_metric_history(run_id, key)]


def test_run_record(_mlflow_store, tmp_path):
  config = tmp_path / "operative_config.gin"
  config.write_text("ModelConfig.embed_dim = 64\n")
  with _tracker(
    _mlflow_store, tmp_path, run_name="baseline", tags={"ablax.config_hash": "abc"}
  ) as t:
    t.log_params({"ModelConfig.embed_dim": 64, "long": "x" * 7000, "odd key!": 1})
    t.set_tags({"git.dirty": "false"})
    for step in range(50):
      t.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 0.01, "nan": float("nan")}, step)
    t.log_artifact(config, "config")
    config.write_text("changed after logging\n")  # the logged copy must not change
    t.log_dict({"embedding": 10, "total": 20}, "params.json")
    t.log_text("diff --git", "code/diff.patch")
    run_id = t.run_id
  client = MlflowClient(_mlflow_store)
  run = client.get_run(run_id)
  assert run.info.status == "FINISHED"
  assert run.info.run_name == "baseline"
  assert run.data.params["ModelConfig.embed_dim"] == "64"
  assert len(run.data.params["long"]) == 6000 and run.data.params["long"].endswith("[truncated]")
  assert "odd key_" in run.data.params
  assert run.data.tags["ablax.config_hash"] == "abc" and run.data.tags["git.dirty"] == "false"
  assert _steps(client, run_id, "train/loss") == list(range(50))
  assert math.isnan(client.get_metric_history(run_id, "nan")[0].value)
  paths = {a.path for a in client.list_artifacts(run_id)}
  assert {"config", "params.json", "code", "ablax"} <= paths
  local = client.download_artifacts(run_id, "config/operative_config.gin", str(tmp_path / "dl"))
  assert open(local).read() == "ModelConfig.embed_dim = 64\n"
  assert t.pending == 0


def test_failing_run_marked_failed_with_error(_mlflow_store, tmp_path):
  with pytest.raises(ZeroDivisionError):
    with _tracker(_mlflow_store, tmp_path) as t:
      t.log_metrics({"loss": 1.0}, 0)
      1 / 0  # noqa: B018
  client = MlflowClient(_mlflow_store)
  run = client.get_run(t.run_id)
  assert run.info.status == "FAILED"
  assert "ZeroDivisionError" in run.data.tags["ablax.error"]
  text = open(client.download_artifacts(t.run_id, "error.txt", str(tmp_path / "dl"))).read()
  assert "1 / 0" in text and "ZeroDivisionError" in text
  assert _steps(client, t.run_id, "loss") == [0]


def test_explicit_end_status(_mlflow_store, tmp_path):
  t = _tracker(_mlflow_store, tmp_path)
  t.start()
  with pytest.raises(ValueError, match="status"):
    t.end("DONE")
  t.end("KILLED", error="SIGTERM at step 7")
  run = MlflowClient(_mlflow_store).get_run(t.run_id)
  assert run.info.status == "KILLED" and run.data.tags["ablax.error"] == "SIGTERM at step 7"


def test_resume_continues_the_same_run(_mlflow_store, tmp_path):
  first = _tracker(_mlflow_store, tmp_path, run_name="long")
  first.start()
  for step in range(10):
    first.log_metrics({"loss": float(step)}, step)
  first.end("KILLED")  # preempted
  second = _tracker(_mlflow_store, tmp_path, run_id=first.run_id)
  assert second.start() == first.run_id
  client = MlflowClient(_mlflow_store)
  assert client.get_run(first.run_id).info.status == "RUNNING"
  for step in range(10, 20):
    second.log_metrics({"loss": float(step)}, step)
  second.end()
  assert client.get_run(first.run_id).info.status == "FINISHED"
  assert _steps(client, first.run_id, "loss") == list(range(20))
  experiment = client.get_experiment_by_name("tests")
  assert len(client.search_runs([experiment.experiment_id])) == 1


class _Store:
  """A client in front of the real one whose uploads hang on `gate` or fail while `down` is set."""

  def __init__(self, client):
    self.client, self.gate, self.down = client, threading.Event(), threading.Event()
    self.gate.set()

  def __getattr__(self, name):
    real = getattr(self.client, name)
    if not name.startswith(("log_", "set_")):
      return real

    def call(*args, **kwargs):
      self.gate.wait(30)
      if self.down.is_set():
        raise ConnectionError("store unreachable")
      return real(*args, **kwargs)

    return call


def test_resume_delivers_what_an_earlier_process_left_in_the_journal(_mlflow_store, tmp_path):
  t = _tracker(_mlflow_store, tmp_path)
  t.start()
  t.log_metrics({"loss": 0.0}, 0)
  t.end("KILLED")
  # An earlier process of this run journaled steps 1-2, lost the store and died.
  now = int(time.time() * 1000)
  with open(tmp_path / "run" / journal.METRICS_FILE, "a") as f:
    for step in (1, 2):
      f.write(json.dumps({"step": step, "time": now + step, "loss": float(step)}) + "\n")
  resumed = _tracker(_mlflow_store, tmp_path, run_id=t.run_id)
  resumed.start()
  resumed.log_metrics({"loss": 3.0}, 3)
  resumed.end()
  assert _steps(MlflowClient(_mlflow_store), t.run_id, "loss") == [0, 1, 2, 3]
  assert resumed.pending == 0


def test_log_metrics_does_not_wait_for_the_store(_mlflow_store, tmp_path):
  t = _tracker(_mlflow_store, tmp_path)
  t.start()
  store = t.syncer.client = _Store(t.syncer.client)
  store.gate.clear()  # the store hangs until the test opens the gate
  for step in range(200):
    t.log_metrics({"loss": float(step), "lr": 0.1}, step)
  time.sleep(1.5)  # the uploader is stuck in its first upload
  # Every call returned while the uploader was stuck.
  assert t.syncer.delivered_batches == 0
  store.gate.set()
  assert t.flush(30)
  t.end()
  assert _steps(MlflowClient(_mlflow_store), t.run_id, "loss") == list(range(200))


class _SlowValue:
  """A value that takes a while to read, as a JAX scalar whose step is still running."""

  def __float__(self):
    time.sleep(0.05)
    return 1.5


def test_log_metrics_reads_values_and_writes_the_journal_off_the_calling_thread(
  _mlflow_store, tmp_path
):
  t = _tracker(_mlflow_store, tmp_path)
  t.start()
  t0 = time.perf_counter()
  for step in range(20):
    t.log_metrics({"loss": _SlowValue()}, step)
  assert time.perf_counter() - t0 < 0.5  # reading them takes 1 s
  t.end()  # everything queued is journaled, in order, before the last upload
  path = tmp_path / "run" / journal.METRICS_FILE
  assert [(line["step"], line["loss"]) for _, line in journal.read(path)] == [
    (step, 1.5) for step in range(20)
  ]
  assert _steps(MlflowClient(_mlflow_store), t.run_id, "loss") == list(range(20))


def test_jax_values_are_converted(_mlflow_store, tmp_path):
  import jax.numpy as jnp

  with _tracker(_mlflow_store, tmp_path) as t:
    t.log_metrics({"loss": jnp.float32(2.5), "gnorm": jnp.array(0.5), "bad": "n/a"}, 3)
  client = MlflowClient(_mlflow_store)
  assert client.get_metric_history(t.run_id, "loss")[0].value == 2.5
  assert client.get_metric_history(t.run_id, "gnorm")[0].value == 0.5
  assert client.get_metric_history(t.run_id, "bad") == []


def test_batches_respect_mlflow_limits(_mlflow_store, tmp_path):
  with _tracker(_mlflow_store, tmp_path) as t:
    t.log_params({f"p{i}": i for i in range(250)})
    t.set_tags({f"t{i}": i for i in range(150)})
    t.log_metrics({f"m{i}": float(i) for i in range(1500)}, 0)
  run = MlflowClient(_mlflow_store).get_run(t.run_id)
  assert len(run.data.params) == 250 and len(run.data.metrics) == 1500
  assert run.data.tags["t149"] == "149"


def test_outage_keeps_the_journal_and_the_status_for_a_later_sync(_mlflow_store, tmp_path):
  t = _tracker(_mlflow_store, tmp_path, end_timeout_s=5)
  t.start()
  t.log_metrics({"loss": 0.0}, 0)
  assert t.flush(30)
  store = t.syncer.client = _Store(t.syncer.client)
  store.down.set()
  for step in range(1, 4):
    t.log_metrics({"loss": float(step)}, step)
  assert t.flush(5) is False  # kept, not delivered
  assert t.end("FINISHED") is False
  workdir = tmp_path / "run"
  offset = json.loads((workdir / sync.STATE_FILE).read_text())["metrics_offset"]
  # Nothing past the offset reached the store, in order; the status waits in run.json.
  assert [line["step"] for _, line in journal.read(workdir / journal.METRICS_FILE, offset)] == [
    1,
    2,
    3,
  ]
  assert local.read_run_file(workdir)[local.STATUS] == "FINISHED"
  client = MlflowClient(_mlflow_store)
  assert client.get_run(t.run_id).info.status == "RUNNING"
  waiting = t.pending
  assert waiting >= 4  # three lines and the status
  assert sync.Syncer(workdir, t.run_id, client).sync() == waiting
  assert client.get_run(t.run_id).info.status == "FINISHED"
  assert _steps(client, t.run_id, "loss") == [0, 1, 2, 3]
  assert sync.Syncer(workdir, t.run_id).pending() == 0


# ---------------------------------------------------------------- bad stores


def test_unwritable_sqlite_store_fails_at_start(tmp_path):
  blocker = tmp_path / "not_a_dir"
  blocker.write_text("")
  t = RunTracker(f"sqlite:///{blocker}/mlflow.db", "x", workdir=tmp_path / "run")
  with pytest.raises(TrackingStoreError, match="cannot open the run"):
    t.start()


def test_unwritable_workdir_fails_at_start(_mlflow_store, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(TrackingStoreError, match="workdir"):
    RunTracker(_mlflow_store, "x", workdir=blocker / "run").start()


def test_unreachable_server_fails_at_start(tmp_path, monkeypatch):
  import socket

  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
  monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # a user's own setting
  t = RunTracker(f"http://127.0.0.1:{port}", "x", workdir=tmp_path / "run")
  with pytest.raises(TrackingStoreError, match=f"127.0.0.1:{port}"):
    t.start()
  # MLflow's default (7 retries over minutes) is bounded; the user's value wins.
  assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
  assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


def test_default_uri_comes_from_the_environment(_mlflow_store, tmp_path):
  t = RunTracker(None, "env", workdir=tmp_path / "run")
  t.start()
  t.end()
  assert t.tracking_uri == _mlflow_store
  assert MlflowClient(_mlflow_store).get_run(t.run_id).info.status == "FINISHED"


def test_resume_of_unknown_run_fails(_mlflow_store, tmp_path):
  with pytest.raises(TrackingStoreError, match="cannot resume run"):
    _tracker(_mlflow_store, tmp_path, run_id="0123456789abcdef0123456789abcdef").start()


def test_logging_before_start_is_an_error(_mlflow_store, tmp_path):
  with pytest.raises(RuntimeError, match="start"):
    _tracker(_mlflow_store, tmp_path).log_metrics({"a": 1.0}, 0)


def test_null_tracker_has_the_same_interface():
  public = {n for n in dir(RunTracker) if not n.startswith("_")}
  assert public <= set(dir(NullTracker))
  t = NullTracker()
  with t:
    assert t.start() is None
    t.log_metrics({"a": 1.0}, 0)
    t.log_params({"a": 1})
    assert t.flush(1) and t.end()


# ---------------------------------------------------------------- the journal and its offset


class _FlakyClient:
  """Takes `fails_after` log_batch calls, then is unreachable."""

  def __init__(self, fails_after):
    self.fails_after, self.steps = fails_after, []

  def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=True):
    if len(self.steps) == self.fails_after:
      raise ConnectionError("down")
    self.steps.append(sorted({m.step for m in metrics}))


def test_journal_round_trip_and_an_upload_that_stops_half_way(tmp_path):
  j = journal.Journal(tmp_path)
  values = [1.0, float("nan"), float("inf"), -float("inf"), 5.0]
  for step, v in enumerate(values):  # 600 metrics a line: one line per batch of 1000
    j.append({**{f"m{i}": float(i) for i in range(599)}, "v": v}, step)
  j.close()
  got = [line for _, line in journal.read(tmp_path / journal.METRICS_FILE)]
  assert [line["step"] for line in got] == [0, 1, 2, 3, 4]
  assert math.isnan(got[1]["v"]) and got[2]["v"] == math.inf and got[3]["v"] == -math.inf

  flaky = _FlakyClient(fails_after=2)
  with pytest.raises(ConnectionError):
    sync.Syncer(tmp_path, "run", flaky).sync()
  assert flaky.steps == [[0], [1]]
  # The offset moved past what the store took, and was persisted.
  assert sync.Syncer(tmp_path, "run").pending() == 3
  again = _FlakyClient(fails_after=100)
  assert sync.Syncer(tmp_path, "run", again).sync() == 3
  assert again.steps == [[2], [3], [4]] and sync.Syncer(tmp_path, "run").pending() == 0


def test_a_line_cut_by_a_kill_is_never_read_and_is_dropped_on_reopen(tmp_path):
  j = journal.Journal(tmp_path)
  j.append({"loss": 1.0}, 1)
  j.close()
  path = tmp_path / journal.METRICS_FILE
  with open(path, "a") as f:
    f.write('{"step": 2, "lo')  # the kill came mid-line
  assert [line["step"] for _, line in journal.read(path)] == [1]
  journal.Journal(tmp_path).append({"loss": 2.0}, 2)
  assert [line["step"] for _, line in journal.read(path)] == [1, 2]


def test_an_upload_repeated_after_a_lost_offset_records_each_point_once(_mlflow_store, tmp_path):
  # The store took a batch but the offset was not persisted (a crash in between): the next
  # sync sends it again, and the store keeps the identical metric once.
  t = _tracker(_mlflow_store, tmp_path)
  t.start()
  t.log_metrics({"loss": 1.5}, 7)
  t.log_params({"a": "1"})
  assert t.flush(30)
  t.end()
  state = tmp_path / "run" / sync.STATE_FILE
  state.write_text(json.dumps({**json.loads(state.read_text()), "metrics_offset": 0, "record": {}}))
  client = MlflowClient(_mlflow_store)
  assert sync.Syncer(tmp_path / "run", t.run_id, client).sync() >= 2
  history = client.get_metric_history(t.run_id, "loss")
  assert [(m.step, m.value) for m in history] == [(7, 1.5)]
  assert client.get_run(t.run_id).data.params == {"a": "1"}


def test_exit_without_end_delivers_and_marks_killed(_mlflow_store, tmp_path):
  import subprocess
  import sys

  script = (
    "import sys\n"
    "from core.tracking.run import RunTracker\n"
    "t = RunTracker(sys.argv[1], 'x', workdir=sys.argv[2], batch_interval_s=30)\n"
    "t.start()\n"
    "for s in range(20): t.log_metrics({'loss': float(s)}, s)\n"
    "print(t.run_id)\n"
  )  # and exit with records still queued, end() never called
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [sys.executable, "-c", script, _mlflow_store, str(tmp_path / "run")],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=repo,
    env=dict(os.environ, PYTHONPATH=repo),
  )
  assert out.returncode == 0, out.stderr
  run_id = out.stdout.strip().splitlines()[-1]
  client = MlflowClient(_mlflow_store)
  assert client.get_run(run_id).info.status == "KILLED"
  assert _steps(client, run_id, "loss") == list(range(20))


def test_system_metrics_are_sampled_for_a_client_created_run(_mlflow_store, tmp_path):
  t = _tracker(_mlflow_store, tmp_path, system_metrics_s=0.2)
  run_id = t.start()
  time.sleep(1.5)
  assert t.end("FINISHED")
  metrics = MlflowClient(_mlflow_store).get_run(run_id).data.metrics
  assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)
  assert any(k.startswith("system/system_memory_usage") for k in metrics)
