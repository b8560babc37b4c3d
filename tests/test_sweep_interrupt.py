"""An interrupted sweep resumes: SIGTERM mid-point, then the same command finishes the rest.

The sweep forwards SIGTERM to the running child, which checkpoints; the parent run is
marked KILLED. Re-running skips the finished point, resumes the interrupted one from its
checkpoint in the same MLflow run, and runs the point never started.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from analysis import runs as runs_lib

REPO = Path(__file__).resolve().parent.parent

SWEEP = """\
from __gin__ import dynamic_registration
import launch.sweep

launch.sweep.Sweep:
  name = 'interrupted'
  base = ['gin/experiments/tiny_llama.gin']
  params = [
      'core.model.config.ModelConfig.num_layers = 1',
      'core.train.loop.train.num_steps = 120',
      'core.train.loop.train.log_every = 10',
      'core.train.loop.train.eval_every = 0',
      'core.train.loop.train.eval_batches = 0',
      'core.train.loop.train.checkpoint_every = 10',
      'core.train.loop.train.export_model = False',
  ]
  axes = {'attention': {'mha': ['core.model.config.ModelConfig.num_kv_heads = 4'],
                        'mqa': ['ablations/variants/mqa.gin']}}
  seeds = [0]
"""


def _wait_for(predicate, proc, what: str, timeout: float = 300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    assert proc.poll() is None, f"the sweep exited (rc {proc.returncode}) before {what}"
    time.sleep(0.2)
  raise TimeoutError(what)


def test_interrupted_sweep_resumes_where_it_stopped(tmp_path):
  path = tmp_path / "interrupted.gin"
  path.write_text(textwrap.dedent(SWEEP))
  uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
  workdir = tmp_path / "w"
  # One worker: the first point finishes, the second is cut mid-run.
  command = [
    sys.executable,
    "-m",
    "launch.cli",
    "sweep",
    str(path),
    "--workdir",
    str(workdir),
    "--tracking_uri",
    uri,
    "--workers",
    "1",
    "--no_compare",
  ]
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO), "ABLAX_CPU_PEAK_FLOPS": "1e11"}
  log = tmp_path / "sweep.out"
  with open(log, "w") as out:
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

  def second_point_checkpointed() -> bool:
    # A point directory with a checkpoint but not the last one (the finished point keeps
    # its last few, so only a directory without step 120 is the running point's).
    return "[1/2]" in log.read_text() and any(
      any(p.name.isdigit() for p in d.iterdir()) and not (d / "120").exists()
      for d in workdir.glob("*/checkpoints")
    )

  try:
    _wait_for(second_point_checkpointed, proc, "the second point's first checkpoint")
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(180)
  finally:
    if proc.poll() is None:
      proc.kill()
  text = log.read_text()
  assert rc == 130, text[-3000:]
  assert "interrupted; run the same command again to resume" in text

  c = runs_lib.client(uri)
  parent = runs_lib.find_sweep(c, "interrupted")
  assert parent.info.status == "KILLED"
  children = runs_lib.sweep_children(c, parent, finished_only=False)
  statuses = sorted(r.info.status for r in children)
  cut = [r for r in children if r.info.status != "FINISHED"]
  assert len(cut) == 1 and "FINISHED" in statuses, statuses
  cut_dir = workdir / cut[0].data.tags[runs_lib.POINT_TAG]
  cut_step = max(int(p.name) for p in (cut_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert 0 < cut_step < 120  # stopped mid-run, with a checkpoint of its own (SIGTERM saves)

  again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert "1 finished before, 1 to run" in again.stdout  # the finished point is not rerun
  assert "2/2 points finished" in again.stdout
  parent = runs_lib.find_sweep(c, "interrupted")
  assert parent.info.status == "FINISHED"
  children = runs_lib.sweep_children(c, parent, finished_only=False)
  assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
  # The cut point continued its own MLflow run from its checkpoint, not from step 0.
  resumed = next(r for r in children if r.info.run_id == cut[0].info.run_id)
  point_log = (workdir / "logs" / f"{resumed.data.tags[runs_lib.POINT_TAG]}.log").read_text()
  assert f"from step {cut_step}" in point_log
  steps = [m.step for m in c.get_metric_history(resumed.info.run_id, "train/loss")]
  assert sorted(set(steps)) == list(range(10, 121, 10))


# -- a sweep killed outright, and points another process is training --------------------------

CHILD = """
import signal, sys, time
sys.path.insert(0, sys.argv[2])
from launch import parent_watch
def stopped(signum, frame):
  open(sys.argv[1], "w").write("SIGTERM")
  sys.exit(0)
signal.signal(signal.SIGTERM, stopped)
parent_watch.start(interval_s=0.1)
print("watching", flush=True)
time.sleep(120)
"""

PARENT = """
import os, subprocess, sys, time
env = dict(os.environ, ABLAX_PARENT_PID=str(os.getpid()))
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]], env=env,
                         start_new_session=True, stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "watching"
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_child_in_its_own_session_stops_when_its_parent_is_killed(tmp_path):
  marker = tmp_path / "stopped"
  parent = subprocess.Popen(
    [sys.executable, "-c", PARENT, CHILD, str(marker), str(REPO)], stdout=subprocess.PIPE, text=True
  )
  child_pid = int(parent.stdout.readline())
  assert not marker.exists()
  parent.send_signal(signal.SIGKILL)
  parent.wait(30)
  deadline = time.monotonic() + 20
  while not marker.exists():
    assert time.monotonic() < deadline, "the child outlived its parent"
    time.sleep(0.05)
  assert marker.read_text() == "SIGTERM"  # the trainer's own stop: checkpoint, exit
  while time.monotonic() < deadline:
    try:
      os.kill(child_pid, 0)
    except ProcessLookupError:
      return
    time.sleep(0.05)
  raise AssertionError("the child did not exit")


HOLD_LOCK = (
  "import sys, time; sys.path.insert(0, sys.argv[2]); "
  "from core.train import workdir_lock; "
  "workdir_lock.WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); "
  "time.sleep(600)"
)


def test_a_rerun_leaves_a_point_whose_workdir_is_held_alone(tmp_path):
  from launch import sweep as sweep_lib  # pylint: disable=g-import-not-at-top

  path = tmp_path / "held.gin"
  path.write_text(textwrap.dedent(SWEEP).replace("'interrupted'", "'held'"))
  points = sweep_lib.expand(sweep_lib.load(str(path), []))
  workdir = tmp_path / "w"
  point_dirs = [workdir / p.key for p in points]
  for d in point_dirs:
    d.mkdir(parents=True)
  holders = [
    subprocess.Popen(
      [sys.executable, "-c", HOLD_LOCK, str(d), str(REPO)], stdout=subprocess.PIPE, text=True
    )
    for d in point_dirs
  ]
  uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
  try:
    for h in holders:
      assert h.stdout.readline().strip() == "held"
    result = subprocess.run(
      [
        sys.executable,
        "-m",
        "launch.cli",
        "sweep",
        str(path),
        "--workdir",
        str(workdir),
        "--tracking_uri",
        uri,
        "--workers",
        "1",
        "--no_compare",
      ],
      cwd=REPO,
      env={**os.environ, "PYTHONPATH": str(REPO)},
      capture_output=True,
      text=True,
      timeout=300,
    )
  finally:
    for h in holders:
      h.send_signal(signal.SIGKILL)
      h.wait(30)
  assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
  assert f"0 finished before, {len(points)} running elsewhere, 0 to run" in result.stdout
  for h, p in zip(holders, points):
    assert f"{p.key}: being trained by pid {h.pid} on " in result.stdout
  assert not (workdir / "logs").exists() or not any((workdir / "logs").iterdir())  # none started
  c = runs_lib.client(uri)
  parent = runs_lib.find_sweep(c, "held")
  assert parent.info.status == "KILLED"  # not finished: the same command completes it later


@pytest.mark.slow  # ~2 min: two points train, the sweep is killed, the rerun finishes them
def test_a_sweep_killed_outright_leaves_no_orphans_and_its_rerun_resumes_them(tmp_path):
  from core.train import workdir_lock  # pylint: disable=g-import-not-at-top

  path = tmp_path / "interrupted.gin"
  path.write_text(textwrap.dedent(SWEEP))
  uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
  workdir = tmp_path / "w"
  command = [
    sys.executable,
    "-m",
    "launch.cli",
    "sweep",
    str(path),
    "--workdir",
    str(workdir),
    "--tracking_uri",
    uri,
    "--workers",
    "2",
    "--no_compare",
  ]
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO), "ABLAX_CPU_PEAK_FLOPS": "1e11"}
  proc = subprocess.Popen(
    command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )

  def both_checkpointed() -> bool:
    dirs = list(workdir.glob("*/checkpoints"))
    return len(dirs) == 2 and all(any(p.name.isdigit() for p in d.iterdir()) for d in dirs)

  try:
    _wait_for(both_checkpointed, proc, "a checkpoint in both points")
    trainers = [workdir_lock.holder(d.parent) for d in workdir.glob("*/checkpoints")]
    assert all(t and t["pid"] for t in trainers), trainers
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
  finally:
    if proc.poll() is None:
      proc.kill()
  deadline = time.monotonic() + 120
  while any(workdir_lock.holder(d.parent) for d in workdir.glob("*/checkpoints")):
    assert time.monotonic() < deadline, "trainers outlived the sweep"
    time.sleep(0.2)
  for log in (workdir / "logs").glob("*.log"):
    assert "that started this run is gone; stopping" in log.read_text()

  again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert "0 finished before, 2 to run" in again.stdout
  c = runs_lib.client(uri)
  parent = runs_lib.find_sweep(c, "interrupted")
  children = runs_lib.sweep_children(c, parent, finished_only=False)
  assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
  for r in children:
    steps = [m.step for m in c.get_metric_history(r.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(10, 121, 10)), steps  # each step once
