"""Faults: SIGKILL then resume reproduces the uninterrupted losses; SIGTERM saves and exits 0;
a non-finite step stops the run naming the step; an unreadable newest checkpoint is skipped."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from core.train import loop, optimizer, synthetic
from core.train.mesh import MeshConfig
from tests.tiny_model import tiny_config

REPO = Path(__file__).resolve().parent.parent

# A tiny LLaMA on synthetic data through the real CLI and gin wiring.
RUN_GIN = """
from __gin__ import dynamic_registration
import core.model.config
import core.train.loop
import core.train.optimizer
import core.train.synthetic

include 'gin/models/base/llama.gin'
include 'gin/train/base.gin'
include 'gin/train/llama_adamw.gin'

core.model.config.ModelConfig:
  vocab_size = 256
  embed_dim = 32
  num_layers = 2
  num_heads = 4
  num_kv_heads = 2
  head_dim = 8
  mlp_dim = 64
  max_seq_len = 32

core.train.loop.train:
  data = @core.train.synthetic.synthetic_batches
  num_steps = 12
  batch_size = 8
  log_every = 1
  eval_every = 0
  eval_batches = 0
  checkpoint_every = 2
  export_model = False

core.train.synthetic.synthetic_batches:
  vocab_size = 256
  seq_len = 32

core.train.optimizer.llama_adamw:
  peak_lr = 1e-2
  warmup_steps = 3
"""


def _command(tmp_path: Path, workdir: Path) -> list[str]:
  gin_file = tmp_path / "run.gin"
  gin_file.write_text(RUN_GIN)
  return [
    sys.executable,
    "-m",
    "launch.cli",
    "train",
    "--gin_file",
    str(gin_file),
    "--workdir",
    str(workdir),
    "--no_tracking",
  ]


def _env(tmp_path: Path) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  # Runs of the same config share compiled steps: the restarted run skips compilation.
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["PYTHONPATH"] = str(REPO)
  env["ABLAX_CPU_PEAK_FLOPS"] = "1e11"  # MFU is not under test; skip the measurement
  return env


def _losses(workdir: Path) -> dict[int, float]:
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "train/loss" in record:
      out[record["step"]] = record["train/loss"]
  return out


def _wait_for_step(workdir: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> int:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if (workdir / "metrics.jsonl").is_file():
      done = max(_losses(workdir) or [0])
      if done >= step:
        return done
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  raise TimeoutError(f"no step {step} in {timeout}s")


def test_resume_after_sigkill_reproduces_uninterrupted_losses(tmp_path):
  env = _env(tmp_path)
  reference = tmp_path / "reference"
  subprocess.run(
    _command(tmp_path, reference), env=env, cwd=REPO, check=True, capture_output=True, timeout=600
  )
  expected = _losses(reference)
  assert sorted(expected) == list(range(1, 13))

  workdir = tmp_path / "killed"
  proc = subprocess.Popen(
    _command(tmp_path, workdir), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
  )
  killed_after = _wait_for_step(workdir, proc, 5)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert killed_after < 12

  resumed = subprocess.run(
    _command(tmp_path, workdir),
    env=env,
    cwd=REPO,
    check=True,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert "resuming" in resumed.stdout
  got = _losses(workdir)
  assert sorted(got) == list(range(1, 13))
  # Identical, not close: same batches, same RNG, same compiled step.
  assert [got[s] for s in range(1, 13)] == [expected[s] for s in range(1, 13)]


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
    _command(tmp_path, workdir),
    env=_env(tmp_path),
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  _wait_for_step(workdir, proc, 3)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "SIGTERM" in out
  last = max(_losses(workdir))
  assert last < 12
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == last  # the step it stopped at was saved, odd or even


def _tiny():
  return tiny_config(
    vocab_size=256,
    mlp_dim=64,
    max_seq_len=32,
    activation="swiglu",
    tie_embeddings=False,
    scale_embeddings=False,
  )


def _train_in_process(workdir, data, steps):
  return loop.train(
    model=_tiny(),
    data=data,
    optimizer=functools.partial(optimizer.llama_adamw, peak_lr=1e-2, warmup_steps=3),
    num_steps=steps,
    batch_size=8,
    workdir=workdir,
    mesh=MeshConfig(1, 1, 1),
    devices=jax.devices()[:1],
    log_every=1,
    eval_batches=0,
    checkpoint_every=2,
    track=False,
    export_model=False,
    progress=False,
    async_checkpoints=False,
  )


class _PoisonedBatches(synthetic.SyntheticBatches):
  """Synthetic batches whose loss mask is NaN in the batch of step `bad_step`."""

  def __init__(self, bad_step, **kwargs):
    super().__init__(**kwargs)
    self.bad_step = bad_step

  def __next__(self):
    batch = super().__next__()
    if self.step == self.bad_step:
      batch["loss_mask"] = batch["loss_mask"] * np.nan
    return batch


def test_non_finite_stop_then_unreadable_latest_checkpoint_falls_back(tmp_path):
  # A NaN in the batch of step 5 stops the run naming the step; steps 2 and 4 stay saved.
  poisoned = functools.partial(_PoisonedBatches, 5, vocab_size=256, seq_len=32)
  with pytest.raises(
    loop.NonFiniteError,
    match=r"non-finite loss at step 5 .*last good "
    r"checkpoint: step 4",
  ):
    _train_in_process(tmp_path, poisoned, 8)
  ckpt = tmp_path / "checkpoints"
  assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [2, 4]
  first = _losses(tmp_path)
  assert sorted(first) == [1, 2, 3, 4]

  # A partial write: the array data of step 4 is cut short. The run goes on from step 2.
  for path in sorted((ckpt / "4" / "state").rglob("*")):
    if path.is_file() and path.stat().st_size > 1000:
      path.write_bytes(path.read_bytes()[:100])
  clean = functools.partial(synthetic.synthetic_batches, vocab_size=256, seq_len=32)
  resumed = _train_in_process(tmp_path, clean, 6)
  assert sorted(resumed.losses) == [3, 4, 5, 6]
  assert resumed.losses[3] == first[3] and resumed.losses[4] == first[4]
