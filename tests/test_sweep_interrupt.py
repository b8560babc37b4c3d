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
  command = [sys.executable, "-m", "launch.cli", "sweep", str(path), "--workdir", str(workdir),
             "--tracking_uri", uri, "--workers", "1", "--no_compare"]
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(REPO),
         "ABLAX_CPU_PEAK_FLOPS": "1e11"}
  log = tmp_path / "sweep.out"
  with open(log, "w") as out:
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

  def second_point_checkpointed() -> bool:
    # A point directory with a checkpoint but not the last one (the finished point keeps
    # its last few, so only a directory without step 120 is the running point's).
    return "[1/2]" in log.read_text() and any(
        any(p.name.isdigit() for p in d.iterdir()) and not (d / "120").exists()
        for d in workdir.glob("*/checkpoints"))

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
