"""A resumed run's records against a real sqlite MLflow store: each (metric, step) once, changed
values reported; and `ablax tracking sync` delivering a run whose store was down."""

import os
import subprocess
import sys

from mlflow.tracking import MlflowClient

from core.tracking import sync
from core.tracking.run import RunTracker
from core.train import tracking as trk
from core.train import workdir_lock
from tests.test_tracking_server import MlflowServer, _free_port
from tests.test_train_faults import REPO


def _history(client, run_id, key):
  return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


class _Down:
  """A store that cannot be reached."""

  def __getattr__(self, name):
    raise ConnectionError("store unreachable")


def test_resumed_run_logs_each_step_once_and_reports_changed_values(tmp_path, _mlflow_store):
  first = RunTracker(_mlflow_store, "resume", workdir=tmp_path / "run")
  run_id = first.start()
  for step in range(1, 11):  # steps 1-10 delivered; the checkpoint was at step 6
    first.log_metrics({"train/loss": 10.0 - step, "train/tokens_per_s": 100.0 + step}, step=step)
  first.end("KILLED")

  # The next process of the run: steps 6.. again, step 8's loss recomputed differently.
  second = RunTracker(_mlflow_store, "resume", run_id=run_id, workdir=tmp_path / "run")
  second.start()
  said = []
  second.resume(6, say=said.append)
  for step in range(6, 13):
    loss = 10.0 - step + (0.5 if step == 8 else 0.0)
    second.log_metrics({"train/loss": loss, "train/tokens_per_s": 200.0 + step}, step=step)
  second.end("FINISHED")

  client = MlflowClient(_mlflow_store)
  loss = _history(client, run_id, "train/loss")
  assert [s for s, _ in loss] == list(range(1, 13))
  assert dict(loss)[8] == 2.0  # the first delivered value stays
  assert [s for s, _ in _history(client, run_id, "train/tokens_per_s")] == list(range(1, 13))
  # Only the deterministic metric that changed is reported, with metric, step, old and new.
  assert second.journal.mismatches == [("train/loss", 8, 2.0, 2.5)]
  assert len(said) == 1 and "train/loss at step 8 was 2.0" in said[0] and "now 2.5" in said[0]


def test_journaled_points_not_yet_delivered_count_as_logged(tmp_path, _mlflow_store):
  # The store was down when the first process journaled steps 7-8 and died: a resumed run
  # recomputing them logs nothing new, and the store gets the journal's values once.
  first = RunTracker(_mlflow_store, "resume", workdir=tmp_path / "run", batch_interval_s=60)
  run_id = first.start()
  first.syncer.client = _Down()  # nothing reaches the store
  for step in (7, 8):
    first.log_metrics({"train/loss": 1.5 + step}, step=step)
  first.end("KILLED")
  assert MlflowClient(_mlflow_store).get_metric_history(run_id, "train/loss") == []
  second = RunTracker(_mlflow_store, "resume", run_id=run_id, workdir=tmp_path / "run")
  second.start()
  second.resume(5)
  for step in (6, 7, 8):
    second.log_metrics({"train/loss": 1.5 + step}, step=step)
  second.end("FINISHED")
  history = _history(MlflowClient(_mlflow_store), run_id, "train/loss")
  assert history == [(6, 7.5), (7, 8.5), (8, 9.5)]
  assert second.journal.mismatches == []


def _sync(workdir, *extra):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  return subprocess.run(
    [sys.executable, "-m", "launch.cli", "tracking", "sync", str(workdir), *extra],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_tracking_sync_delivers_a_run_whose_store_was_down(tmp_path):
  server = MlflowServer(tmp_path, _free_port())
  server.start()
  workdir = tmp_path / "run"
  workdir.mkdir()
  try:
    # What train() does: the tracker of the workdir, run.json naming its run and store.
    tracker = trk.start_tracker(
      workdir, tracking_uri=server.uri, experiment="sync", run_name="r", enabled=True
    )
    tracker.retry_interval_s = 0.2
    for step in range(1, 6):
      tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
    assert tracker.flush(60)
    server.stop()  # down for the rest of the run
    for step in range(6, 11):
      tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
    tracker.log_dict({"done": True}, "final.json")
    assert tracker.end("FINISHED") is False
    note = trk.undelivered_note(workdir, tracker)
    assert note and f"ablax tracking sync {workdir} --tracking_uri {server.uri}" in note
    run_id = tracker.run_id
    waiting = sync.Syncer(workdir, run_id).pending()
    assert waiting > 0

    down = _sync(workdir)  # still down: said so, nothing lost
    assert down.returncode == 1 and "unreachable" in down.stderr, down.stderr[-2000:]
    assert sync.Syncer(workdir, run_id).pending() == waiting

    # A trainer holding the workdir delivers its own records: sync leaves them alone.
    with workdir_lock.WorkdirLock(workdir):
      busy = _sync(workdir)
    assert busy.returncode == 1 and "is being trained by pid" in busy.stderr

    server.start()
    up = _sync(workdir)
    assert up.returncode == 0, up.stdout + up.stderr[-2000:]
    assert f"delivered {waiting} records of run {run_id}" in up.stdout
    assert sync.Syncer(workdir, run_id).pending() == 0
    client = MlflowClient(server.uri)
    assert [s for s, _ in _history(client, run_id, "train/loss")] == list(range(1, 11))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "final.json" in [a.path for a in client.list_artifacts(run_id)]
    again = _sync(workdir)
    assert again.returncode == 0 and "nothing to deliver" in again.stdout
  finally:
    server.stop()


def test_tracking_sync_of_a_directory_without_runs_is_a_one_line_error(tmp_path):
  result = _sync(tmp_path)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
    f"ablax tracking sync: {tmp_path} holds no run (no run.json in it or in its subdirectories)"
  ]
