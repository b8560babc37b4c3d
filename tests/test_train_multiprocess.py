"""Two processes under jax.distributed train one model and reproduce the single-process losses."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

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


MESH = ["--gin_param", "core.train.mesh.MeshConfig.data = 2",
        "--gin_param", "core.train.mesh.MeshConfig.fsdp = 2",
        "--gin_param", "core.train.mesh.MeshConfig.tensor = 2",
        "--gin_param", "core.train.loop.train.num_steps = 8",
        "--gin_param", "core.train.loop.train.checkpoint_every = 4",
        "--gin_param", "core.train.loop.train.export_model = True"]  # skipped, with a note, by 2 processes


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  single = tmp_path / "single"
  subprocess.run(_command(tmp_path, single) + MESH, env=_env(8), cwd=REPO, check=True,
                 capture_output=True, timeout=600)
  expected = _losses(single)

  multi = tmp_path / "multi"
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      _command(tmp_path, multi) + MESH + ["--coordinator_address", address,
                                          "--num_processes", "2", "--process_id", str(i)],
      env=_env(4), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  got = _losses(multi)
  assert sorted(got) == sorted(expected) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [expected[s] for s in range(1, 9)],
                             rtol=2e-5, atol=2e-5)
  assert (multi / "checkpoints" / "8").is_dir()
  assert "model export skipped" in outputs[0]
