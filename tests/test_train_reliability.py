"""Faults injected into real runs: a second trainer on a workdir, kill -9 then resume with steps
past the checkpoint already in MLflow, a finished run started again, a checkpoint directory that
cannot be written."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from core.train import workdir_lock
from tests.test_train_faults import REPO, RUN_GIN, _env

HOLD_LOCK = (
  "import sys, time; sys.path.insert(0, sys.argv[2]); "
  "from core.train import workdir_lock; "
  "workdir_lock.WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); "
  "time.sleep(600)"
)


def _train(
  tmp_path: Path, workdir: Path, uri: str | None, *params: str, num_steps: int = 12
) -> list[str]:
  gin_file = tmp_path / "run.gin"
  gin_file.write_text(RUN_GIN.replace("num_steps = 12", f"num_steps = {num_steps}"))
  cmd = [
    sys.executable,
    "-m",
    "launch.cli",
    "train",
    "--gin_file",
    str(gin_file),
    "--workdir",
    str(workdir),
  ]
  for p in params:
    cmd += ["--gin_param", p]
  return cmd + (["--tracking_uri", uri] if uri else ["--no_tracking"])


def _ablax_line(stderr: str) -> str:
  """The one line ablax printed, which ends the output (gin may append the configurable's name
  to an error raised through it)."""
  lines = [l for l in stderr.splitlines() if l.startswith("ablax train:")]
  tail = [l for l in stderr.strip().splitlines() if not l.startswith("  In call to configurable")]
  assert len(lines) == 1 and tail[-1] == lines[0], stderr[-3000:]
  return lines[0]


def _jsonl_steps(workdir: Path, key: str) -> list[int]:
  return [
    r["step"]
    for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    if key in r
  ]


def _run_id(workdir: Path) -> str:
  return json.loads((workdir / "run.json").read_text())["mlflow_run_id"]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
  return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _ckpt_steps(workdir: Path) -> list[int]:
  d = workdir if workdir.name.startswith("checkpoints") else workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_a_second_trainer_on_a_held_workdir_exits_at_once_naming_the_holder(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD_LOCK, str(workdir), str(REPO)], stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    second = subprocess.run(
      _train(tmp_path, workdir, None),
      env=_env(tmp_path),
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert second.returncode == 1, second.stderr[-2000:]
    assert "Traceback" not in second.stderr, second.stderr[-2000:]
    assert f"{workdir} is being trained by pid {holder.pid} on " in _ablax_line(second.stderr)
    # It left the holder's run alone: no config written, no checkpoint, no metrics.
    assert sorted(p.name for p in workdir.iterdir()) == [workdir_lock.LOCK_FILE]
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
  # kill -9 released it: nothing is left to clean up before the next trainer.
  assert workdir_lock.holder(workdir) is None
  workdir_lock.WorkdirLock(workdir).acquire(wait_s=0).release()


@pytest.mark.slow  # ~40 s: two real trainers
def test_two_real_trainers_on_one_workdir_the_second_exits(tmp_path):
  workdir = tmp_path / "run"
  env = _env(tmp_path)
  first = subprocess.Popen(
    _train(tmp_path, workdir, None, num_steps=100000),
    env=env,
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    deadline = time.monotonic() + 300
    while not (workdir / "metrics.jsonl").is_file():
      assert first.poll() is None and time.monotonic() < deadline
      time.sleep(0.1)
    second = subprocess.run(
      _train(tmp_path, workdir, None, num_steps=100000),
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert second.returncode == 1
    assert f"is being trained by pid {first.pid} on " in second.stderr
    assert first.poll() is None  # the first goes on
  finally:
    first.send_signal(signal.SIGTERM)
    first.wait(120)
  steps = _jsonl_steps(workdir, "train/loss")
  assert steps == list(range(1, len(steps) + 1))  # one trainer's rows, each step once


@pytest.mark.slow  # ~2 min on 2 busy cores; test_tracking_delivered covers the filter in seconds
def test_kill_then_resume_logs_each_step_once_and_a_finished_run_is_a_no_op(tmp_path):
  uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
  workdir = tmp_path / "run"
  env = _env(tmp_path)
  params = (
    "core.train.loop.train.checkpoint_every = 10",
    "core.train.loop.train.eval_batches = 2",
    "core.train.loop.train.export_model = True",
  )
  cmd = _train(tmp_path, workdir, uri, *params, num_steps=300)
  proc = subprocess.Popen(
    cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  client = MlflowClient(uri)
  # Kill once MLflow holds steps past the newest checkpoint (those are the ones re-run).
  deadline = time.monotonic() + 300
  while True:
    assert proc.poll() is None and time.monotonic() < deadline, "finished before the kill"
    if (workdir / "run.json").is_file():
      saved = _ckpt_steps(workdir)
      logged = [s for s, _ in _history(client, _run_id(workdir), "train/loss")]
      if saved and logged and max(logged) >= saved[-1] + 3:
        break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait(60)
  run_id = _run_id(workdir)
  before = dict(_history(client, run_id, "train/loss"))
  checkpoint = max(_ckpt_steps(workdir))
  redone = [s for s in before if s > checkpoint]
  assert redone, "nothing past the checkpoint reached MLflow before the kill"

  resumed = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"from step {checkpoint}" in resumed.stdout
  # A bit-identical resume: the re-run steps match what was delivered, so nothing is reported.
  assert "differs from the interrupted one" not in resumed.stdout
  run = client.get_run(run_id)
  assert run.info.status == "FINISHED"
  for key in run.data.metrics:
    if key.startswith("system/"):
      continue  # MLflow's own sampler numbers its samples
    steps = [s for s, _ in _history(client, run_id, key)]
    assert len(steps) == len(set(steps)), (key, sorted(s for s in steps if steps.count(s) > 1))
  after = dict(_history(client, run_id, "train/loss"))
  assert sorted(after) == list(range(1, 301))
  assert all(after[s] == before[s] for s in redone)
  assert _jsonl_steps(workdir, "train/loss") == list(range(1, 301))
  assert [s for s, _ in _history(client, run_id, "energy/energy_kwh")].count(300) == 1
  assert len(_history(client, run_id, "eval/loss")) == 1

  # Started again on the finished run: nothing trained, evaluated, exported or logged.
  model_mtime = (workdir / "model").stat().st_mtime_ns
  metrics_before = {k: _history(client, run_id, k) for k in client.get_run(run_id).data.metrics}
  again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "finished at step 300 before; nothing to do" in again.stdout
  assert "compiled" not in again.stdout and "exported" not in again.stdout
  assert (workdir / "model").stat().st_mtime_ns == model_mtime
  assert {k: _history(client, run_id, k) for k in metrics_before} == metrics_before
  assert client.get_run(run_id).info.status == "FINISHED"


def _make_unwritable(directory: Path, how: str) -> None:
  if how == "immutable":
    subprocess.run(["chattr", "+i", str(directory)], check=True, capture_output=True)
  else:  # the path a save goes to is a regular file: works for any user, root included
    directory.rename(directory.with_name("checkpoints.moved"))
    directory.write_text("not a directory\n")


def _chattr_works(tmp_path: Path) -> bool:
  probe = tmp_path / "chattr_probe"
  probe.mkdir()
  ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
  if ok:
    subprocess.run(["chattr", "-i", str(probe)], check=True)
  return ok


@pytest.mark.parametrize(
  "how", ["not_a_directory", pytest.param("immutable", marks=pytest.mark.slow)]
)
def test_a_checkpoint_that_cannot_be_written_stops_the_run_within_seconds(tmp_path, how):
  if how == "immutable" and not _chattr_works(tmp_path):
    pytest.skip("chattr +i needs root (CAP_LINUX_IMMUTABLE) on ext2/3/4, xfs or btrfs")
  uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
  workdir = tmp_path / "run"
  # Saves far enough apart that the fault lands between two of them.
  proc = subprocess.Popen(
    _train(tmp_path, workdir, uri, "core.train.loop.train.checkpoint_every = 20", num_steps=100000),
    env=_env(tmp_path),
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  ckpt = workdir / "checkpoints"
  deadline = time.monotonic() + 300
  # Between two saves: step 20 written, no save in flight.
  while not ((ckpt / "20").is_dir() and not any("tmp" in p.name for p in ckpt.iterdir())):
    assert proc.poll() is None and time.monotonic() < deadline
    time.sleep(0.01)
  _make_unwritable(ckpt, how)
  t0 = time.monotonic()
  newest = max(
    _ckpt_steps(ckpt.with_name("checkpoints.moved")) if how != "immutable" else _ckpt_steps(workdir)
  )
  try:
    out, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
    if how == "immutable":
      subprocess.run(["chattr", "-i", str(ckpt)])
  seconds = time.monotonic() - t0
  assert proc.returncode == 1, err[-3000:]
  assert seconds < 30, seconds  # orbax's barrier held it 300 s
  # (orbax may have logged its own threads' errors before the line)
  line = _ablax_line(err)
  error = "PermissionError" if how == "immutable" else "NotADirectoryError"
  assert f"could not be written to {ckpt}: {error}" in line, line
  failed_at = int(line.split("checkpoint step ")[1].split()[0])
  # The first save after the fault stopped it (the trainer may be a save ahead of the test).
  assert newest < failed_at <= newest + 40, (newest, failed_at)
  assert failed_at <= max(_jsonl_steps(workdir, "train/loss")) <= failed_at + 2
  assert MlflowClient(uri).get_run(_run_id(workdir)).info.status == "FAILED"
