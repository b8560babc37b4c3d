"""Bad input gives `ablax <cmd>: <cause>` on one line and exit 2, never a traceback.

Each case is injected through the real CLI; all fail before the train step is
compiled. The read-only workdir runs in a subprocess (a read-only mount
in a private namespace when the tests run as root).
"""

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from mlflow.tracking import MlflowClient

from core.errors import UserError, one_line
from core.train import loop, optimizer, synthetic
from core.train.checkpoint import short_reason
from core.train.mesh import MeshConfig
from launch import cli
from tests.test_train_faults import RUN_GIN, _tiny

REPO = Path(__file__).resolve().parent.parent
P = "core.train.loop.train"
M = "core.model.config.ModelConfig"


def _gin(tmp_path: Path) -> str:
  path = tmp_path / "run.gin"
  path.write_text(RUN_GIN)
  return str(path)


def _train(tmp_path, capsys, *params, workdir=None, tracking=False):
  argv = ["train", "--gin_file", _gin(tmp_path), "--workdir", str(workdir or tmp_path / "w")]
  for p in params:
    argv += ["--gin_param", p]
  if not tracking:
    argv.append("--no_tracking")
  code = cli.main(argv)
  out = capsys.readouterr()
  return code, out.out, out.err


def _one_line(err: str) -> str:
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


CASES = {
  "open bracket": ([f"{P}.num_steps = (1,"], "a bracket or a string is left open"),
  "unset REQUIRED": ([f"{P}.num_steps = %gin.REQUIRED"], "num_steps set to `%gin.REQUIRED`"),
  "log_every 0": ([f"{P}.log_every = 0"], "train.log_every must be an int >= 1, got 0"),
  "grad_accum 0": ([f"{P}.grad_accum_steps = 0"], "train.grad_accum_steps must be an int >= 1"),
  "num_steps 0": ([f"{P}.num_steps = 0"], "train.num_steps must be an int >= 1, got 0"),
  "num_steps < 0": ([f"{P}.num_steps = -5"], "train.num_steps must be an int >= 1, got -5"),
  "checkpoint_every < 0": (
    [f"{P}.checkpoint_every = -1"],
    "train.checkpoint_every must be an int >= 0, got -1",
  ),
  "window > max_seq_len": (
    [f"{M}.attention_pattern = ('local', 'global')", f"{M}.window = 64"],
    "window 64 is longer than max_seq_len 32",
  ),
  "learned, seq_len > max_seq_len": (
    [f"{M}.position_embedding = 'learned'", "core.train.synthetic.synthetic_batches.seq_len = 64"],
    "rows are 64 tokens, longer than ModelConfig.max_seq_len 32 (position_embedding='learned')",
  ),
  "rope, seq_len > max_seq_len": (
    ["core.train.synthetic.synthetic_batches.seq_len = 64"],
    "rows are 64 tokens, longer than ModelConfig.max_seq_len 32 (position_embedding='rope')",
  ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_train_input_is_one_line_and_exit_2(tmp_path, capsys, case):
  params, cause = CASES[case]
  code, out, err = _train(tmp_path, capsys, *params)
  assert code == 2, out + err
  line = _one_line(err)
  assert line.startswith("ablax train: ") and cause in line, line
  # Nothing was trained or exported.
  assert not (tmp_path / "w" / "model").exists()
  assert not (tmp_path / "w" / "checkpoints").exists() or not any(
    (tmp_path / "w" / "checkpoints").iterdir()
  )


def test_workdir_under_a_file_is_one_line(tmp_path, capsys):
  (tmp_path / "a_file").write_text("")
  code, _, err = _train(tmp_path, capsys, workdir=tmp_path / "a_file" / "run")
  assert code == 2
  assert "cannot be written (Not a directory)" in _one_line(err)


@pytest.mark.parametrize(
  "command",
  [
    ["params", "--gin_file", "gin/models/tiny_llama.gin"],
    ["data", "inspect", "--gin_file", "gin/experiments/tiny_llama.gin"],
  ],
)
def test_open_bracket_in_other_commands(capsys, command):
  code = cli.main(command + ["--gin_param", f"{M}.embed_dim = (1,"])
  err = capsys.readouterr().err
  assert code == 2
  line = _one_line(err)
  assert line.startswith(f"ablax {command[0]}: ") and "left open" in line, line


def test_open_bracket_in_a_sweep_file(tmp_path, capsys):
  sweep = tmp_path / "s.gin"
  sweep.write_text("import launch.sweep\nlaunch.sweep.Sweep.name = ('x',\n")
  assert cli.main(["sweep", str(sweep), "--dry_run"]) == 2
  line = _one_line(capsys.readouterr().err)
  assert line.startswith("ablax sweep: ") and "left open" in line and str(sweep) in line, line


def test_debug_env_keeps_the_traceback(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv(cli.DEBUG_ENV, "1")
  with pytest.raises(UserError, match="log_every"):
    _train(tmp_path, capsys, f"{P}.log_every = 0")


def test_one_line_drops_gin_call_notes_and_joins_locations():
  error = ValueError(
    "No configurable matching 'X'.\n  In file \"a.gin\", line 3\n    X.y = 1\n"
    "    ^\n  In call to configurable 'train' (<function train at 0x7f>)"
  )
  assert one_line(error) == "No configurable matching 'X'. (In file \"a.gin\", line 3: X.y = 1)"


def test_unreadable_checkpoints_are_one_line_and_the_run_failed(tmp_path, capsys, _mlflow_store):
  # Two step directories orbax lists but cannot read (no items): nothing to compile first.
  workdir = tmp_path / "w"
  for step in (2, 4):
    (workdir / "checkpoints" / str(step)).mkdir(parents=True)
    (workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").write_text(
      '{"item_handlers": {}}'
    )
  code, _, err = _train(tmp_path, capsys, workdir=workdir, tracking=True)
  assert code == 2, err[-3000:]
  lines = _own_lines(err)
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  assert lines[0].startswith("ablax train: none of the checkpoints in ")
  assert "step 4: KeyError" in lines[0] and "step 2: KeyError" in lines[0]
  # The trainer's record of the failure is kept: the MLflow run is marked FAILED.
  run_id = json.loads((workdir / "run.json").read_text())["mlflow_run_id"]
  assert MlflowClient(_mlflow_store).get_run(run_id).info.status == "FAILED"


def test_short_reason_keeps_tensorstore_code_and_cause():
  message = (
    'OUT_OF_RANGE: Error opening "zarr" driver: Error reading "step/.zarray" in OCDBT '
    'database at local file "/w/checkpoints/2/state/": Error reading Byte range [0, 3084) '
    'of local file "/w/checkpoints/2/state/d/8b30": Requested byte range [0, 3084) is not '
    'valid for value of size 100 [tensorstore_spec[1]=\'{"context":{"cache_pool":{}},'
    '"driver":"zarr"}\']'
  )
  assert short_reason(ValueError(message)) == (
    "ValueError: OUT_OF_RANGE: Requested byte range [0, 3084) is not valid for value of size 100"
  )
  assert short_reason(KeyError("x")) == "KeyError: 'x'"


@pytest.mark.slow  # trains 2 steps first: ~15 s alone, ~50 s on a loaded 2-core machine
def test_cut_array_data_is_one_line_without_tensorstore_noise(tmp_path, capsys):
  # Step 2 of RUN_GIN's model, written in this process (one device).
  workdir = tmp_path / "w"
  loop.train(
    model=_tiny(),
    data=functools.partial(synthetic.synthetic_batches, vocab_size=256, seq_len=32),
    optimizer=functools.partial(optimizer.llama_adamw, peak_lr=1e-2, warmup_steps=3),
    num_steps=2,
    batch_size=8,
    workdir=workdir,
    mesh=MeshConfig(1, 1, 1),
    devices=jax.devices()[:1],
    eval_batches=0,
    track=False,
    export_model=False,
    progress=False,
    async_checkpoints=False,
  )
  cut = 0
  for path in (workdir / "checkpoints" / "2" / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d" and path.stat().st_size > 1000:
      path.write_bytes(path.read_bytes()[:100])  # a partial write of the array data
      cut += 1
  assert cut
  capsys.readouterr()
  code, _, err = _train(tmp_path, capsys, f"{P}.num_steps = 2", workdir=workdir)
  assert code == 2, err[-3000:]
  lines = _own_lines(err)
  # One line: no traceback, no TensorStore spec, no 'Event loop is closed' reports.
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  assert "step 2: ValueError: OUT_OF_RANGE" in lines[0] and "tensorstore_spec" not in lines[0]
  assert len(lines[0]) < 400


# -- in a real process --------------------------------------------------------------------


def _env(tmp_path: Path) -> dict:
  env = dict(
    os.environ,
    PYTHONPATH=str(REPO),
    XLA_FLAGS="",
    ABLAX_CPU_PEAK_FLOPS="1e11",
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
  )
  env.pop(cli.DEBUG_ENV, None)
  return env


def _ablax_train(
  tmp_path: Path, workdir: Path, *params: str, prefix=(), tracking=False
) -> subprocess.CompletedProcess:
  cmd = [
    *prefix,
    sys.executable,
    "-m",
    "launch.cli",
    "train",
    "--gin_file",
    _gin(tmp_path),
    "--workdir",
    str(workdir),
  ] + ([] if tracking else ["--no_tracking"])
  for p in params:
    cmd += ["--gin_param", p]
  return subprocess.run(
    cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300
  )


def _own_lines(stderr: str) -> list[str]:
  # jax's C++ start-up notes (cudart_stub, absl) and MLflow's INFO log are not ours.
  return [
    l
    for l in stderr.splitlines()
    if l.strip()
    and "cudart_stub" not in l
    and "absl::InitializeLog" not in l
    and " INFO mlflow." not in l
  ]


def _can_mount_read_only(path: Path) -> bool:
  if shutil.which("unshare") is None:
    return False
  probe = subprocess.run(
    ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro none {path}"], capture_output=True
  )
  return probe.returncode == 0


def test_read_only_workdir_is_one_line(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  if os.geteuid() != 0:
    ro.chmod(0o555)
    prefix = ()
  elif _can_mount_read_only(ro):
    # Root writes through permission bits: a read-only mount, in a private namespace.
    prefix = ("unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o ro none {ro} && exec "$@"', "sh")
  else:
    pytest.skip("root without user namespaces: no way to make a read-only directory")
  out = _ablax_train(tmp_path, ro, prefix=prefix)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = _own_lines(out.stderr)
  assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert lines[0].startswith("ablax train: workdir ") and "cannot be written" in lines[0]
