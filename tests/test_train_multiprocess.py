"""Two processes under jax.distributed train one model and reproduce the single-process losses."""

import json
import os
import socket
import subprocess

import numpy as np

from core.model_dir import io

from tests.test_train_faults import REPO, _command, _losses


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = str(REPO)
  env["ABLAX_CPU_PEAK_FLOPS"] = "1e11"
  return env


MESH = [
  "--gin_param",
  "core.train.mesh.MeshConfig.data = 2",
  "--gin_param",
  "core.train.mesh.MeshConfig.fsdp = 2",
  "--gin_param",
  "core.train.mesh.MeshConfig.tensor = 2",
  "--gin_param",
  "core.train.loop.train.num_steps = 8",
  "--gin_param",
  "core.train.loop.train.checkpoint_every = 4",
  "--gin_param",
  "core.train.loop.train.export_model = True",
  # Two blocks of rows, each from its own stream: the 2-process run reads one each
  # (host-sharded input), the 1-process run both; the batches are the same.
  "--gin_param",
  "core.train.loop.train.data_shards = 2",
]


# The end-of-run evaluation hook, on held-out synthetic batches: with 2 processes the
# parameters are gathered and process 0 evaluates.
EVALS_GIN = """
from __gin__ import dynamic_registration
import core.eval.suite
import core.train.loop
import core.train.synthetic

core.train.loop.train.evals = @core.eval.suite.EvalSuite()
core.eval.suite.EvalSuite.heldout_batches = {'synthetic': @heldout/core.train.synthetic.synthetic_batches}
heldout/core.train.synthetic.synthetic_batches:
  batch_size = 4
  split = 'validation'
  num_epochs = 1
"""


def _eval_metrics(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {k: v for r in records for k, v in r.items() if k.startswith("eval/heldout/")}


def test_two_processes_match_one(tmp_path):
  (tmp_path / "evals.gin").write_text(EVALS_GIN)
  flags = MESH + ["--gin_file", str(tmp_path / "evals.gin")]
  single = tmp_path / "single"
  subprocess.run(
    _command(tmp_path, single) + flags,
    env=_env(8),
    cwd=REPO,
    check=True,
    capture_output=True,
    timeout=600,
  )
  expected = _losses(single)

  multi = tmp_path / "multi"
  address = f"127.0.0.1:{_free_port()}"
  procs = [
    subprocess.Popen(
      _command(tmp_path, multi)
      + flags
      + ["--coordinator_address", address, "--num_processes", "2", "--process_id", str(i)],
      env=_env(4),
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  got = _losses(multi)
  assert sorted(got) == sorted(expected) == list(range(1, 9))
  np.testing.assert_allclose(
    [got[s] for s in range(1, 9)], [expected[s] for s in range(1, 9)], rtol=2e-5, atol=2e-5
  )
  assert (multi / "checkpoints" / "8").is_dir()
  # The checkpoint holds both blocks' positions, gathered from the two processes.
  data_state = json.loads((multi / "checkpoints" / "8" / "data" / "metadata").read_text())
  assert data_state["shards"] == 2 and {"0", "1"} <= data_state.keys()
  evals = _eval_metrics(single)
  assert evals, "the evaluation hook logged nothing"
  assert _eval_metrics(multi).keys() == evals.keys()
  np.testing.assert_allclose(
    [_eval_metrics(multi)[k] for k in evals], list(evals.values()), rtol=2e-5
  )
  # Process 0 exports the gathered parameters alone; they equal the single-process model's.
  one, _, _ = io.load_model(single / "model")
  two, _, _ = io.load_model(multi / "model")
  for name, value in io.flat_params(one).items():
    np.testing.assert_allclose(io.flat_params(two)[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
