"""SLURM job-array scripts, flags/gin resources and squeue/sacct/scontrol parsing.

No SLURM needed: scripts are checked with `bash -n` and run directly with
SLURM_ARRAY_TASK_ID set; sbatch/squeue/sacct/scontrol are small fakes on PATH.
"""

import argparse
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch import slurm
from launch.slurm import SlurmResources, TaskState

COMMANDS = {
  0: [
    "python",
    "-m",
    "launch.cli",
    "train",
    "--gin_param",
    "core.model.config.ModelConfig.num_kv_heads = 1",
  ],
  2: ["python", "-m", "launch.cli", "train", "--gin_param", "x = 'a b'", "--tag", "k=v;rm -rf /"],
}


def _script(commands=COMMANDS, resources=None, **kw):
  kw.setdefault("job_name", "ablax-attn")
  kw.setdefault("log_dir", "/shared/sweeps/attn/slurm/logs")
  return slurm.render_array_script(commands, resources or SlurmResources(), **kw)


def _directives(script):
  return [line[len("#SBATCH ") :] for line in script.splitlines() if line.startswith("#SBATCH ")]


@pytest.mark.parametrize(
  "indices,expected",
  [
    ([0], "0"),
    ([0, 1, 2], "0-2"),
    ([5, 0, 1, 2, 7, 8], "0-2,5,7-8"),
    ([3, 3, 4], "3-4"),
  ],
)
def test_format_indices(indices, expected):
  assert slurm.format_indices(indices) == expected


def test_default_directives():
  d = _directives(_script())
  assert d == [
    "--job-name=ablax-attn",
    "--array=0,2",
    "--output=/shared/sweeps/attn/slurm/logs/%x-%A_%a.log",
    "--nodes=1",
    "--ntasks-per-node=1",
    "--signal=B:TERM@120",
  ]


def test_all_resources():
  r = SlurmResources(
    partition="gpu",
    nodes=2,
    ntasks_per_node=4,
    gpus_per_node=4,
    cpus_per_task=8,
    mem="256G",
    time="1-00:00:00",
    account="lab",
    qos="high",
    constraint="a100",
    max_parallel=3,
    job_name="mine",
    sbatch_options=["--exclusive"],
    signal_seconds=300,
  )
  d = _directives(_script(resources=r, chdir="/work"))
  assert d == [
    "--job-name=mine",
    "--array=0,2%3",
    "--output=/shared/sweeps/attn/slurm/logs/%x-%A_%a.log",
    "--nodes=2",
    "--ntasks-per-node=4",
    "--chdir=/work",
    "--partition=gpu",
    "--gpus-per-node=4",
    "--cpus-per-task=8",
    "--mem=256G",
    "--time=1-00:00:00",
    "--account=lab",
    "--qos=high",
    "--constraint=a100",
    "--signal=B:TERM@300",
    "--exclusive",
  ]


def test_single_process_points_run_without_srun_multi_process_under_srun():
  assert "srun" not in _script()
  script = _script(resources=SlurmResources(nodes=2))
  assert "  0) cmd=(srun --kill-on-bad-exit=1 python -m launch.cli train" in script
  assert "srun --kill-on-bad-exit=1" in _script(resources=SlurmResources(ntasks_per_node=2))


def test_env_setup_and_labels():
  script = _script(
    env={"MLFLOW_TRACKING_URI": "http://10.0.0.1:5000", "NOTE": "a b"},
    resources=SlurmResources(setup=["module load cuda/12"]),
    labels={0: "kv-1__seed-0 (kv=1)", 2: "two\nlines"},
  )
  assert (
    "export MLFLOW_TRACKING_URI=http://10.0.0.1:5000\nexport NOTE='a b'\nmodule load cuda/12"
    "\nset -u\n"
  ) in script
  assert "  # kv-1__seed-0 (kv=1)\n  0) cmd=(" in script
  assert "  # two lines\n  2) cmd=(" in script


def test_script_is_valid_bash(tmp_path):
  path = tmp_path / "a.sbatch"
  path.write_text(_script(resources=SlurmResources(nodes=2)))
  subprocess.run(["bash", "-n", str(path)], check=True)


@pytest.mark.parametrize(
  "bad",
  [
    dict(nodes=0),
    dict(gpus_per_node=0),
    dict(time="two hours"),
    dict(mem="lots"),
    dict(max_parallel=0),
  ],
)
def test_bad_resources(bad):
  with pytest.raises(ValueError):
    _script(resources=SlurmResources(**bad))


def test_rejects_empty_and_newline_injection():
  with pytest.raises(ValueError):
    _script(commands={})
  with pytest.raises(ValueError):
    _script(resources=SlurmResources(partition="gpu\n#SBATCH --account=other"))
  with pytest.raises(ValueError):
    _script(env={"BAD-NAME": "1"})


def _run_task(tmp_path, commands, index, **kw):
  path = tmp_path / "task.sbatch"
  path.write_text(_script(commands=commands, log_dir=tmp_path, **kw))
  env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(index), SLURM_ARRAY_JOB_ID="77")
  return subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=60)


def test_each_task_runs_its_own_command_with_arguments_intact(tmp_path):
  out = tmp_path / "out.txt"
  prog = "import sys; open(sys.argv[1], 'a').write(repr(sys.argv[2:]) + '\\n')"
  commands = {
    3: [sys.executable, "-c", prog, str(out), "x = 'a b'", "$HOME;`id`"],
    5: [sys.executable, "-c", prog, str(out), "five"],
  }
  proc = _run_task(tmp_path, commands, 3)
  assert proc.returncode == 0, proc.stderr
  assert out.read_text() == repr(["x = 'a b'", "$HOME;`id`"]) + "\n"
  assert "array task 3 of job 77" in proc.stdout


def test_task_exit_status_and_unknown_index(tmp_path):
  commands = {0: [sys.executable, "-c", "raise SystemExit(3)"]}
  assert _run_task(tmp_path, commands, 0).returncode == 3
  proc = _run_task(tmp_path, commands, 9)
  assert proc.returncode == 2 and "no command for array task 9" in proc.stderr


def test_time_limit_signal_reaches_the_command(tmp_path):
  """SLURM signals the batch shell (--signal=B:TERM@...); the trainer must get it."""
  marker = tmp_path / "got-term"
  prog = textwrap.dedent(f"""
      import signal, sys, time
      def on_term(*_):
        open({str(marker)!r}, 'w').write('saved')
        sys.exit(0)
      signal.signal(signal.SIGTERM, on_term)
      print('ready', flush=True)
      time.sleep(60)
  """)
  path = tmp_path / "task.sbatch"
  path.write_text(_script(commands={0: [sys.executable, "-c", prog]}, log_dir=tmp_path))
  env = dict(os.environ, SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_JOB_ID="1")
  proc = subprocess.Popen(["bash", str(path)], env=env, stdout=subprocess.PIPE, text=True)
  try:
    for line in proc.stdout:
      if line.strip() == "ready":
        break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
  assert marker.read_text() == "saved"


# ---------------------------------------------------------------- parsing


def test_parse_squeue():
  text = "12_3|RUNNING|None\n12_[4-6%2]|PENDING|JobArrayTaskLimit\n99|RUNNING|None\n"
  tasks = slurm.parse_squeue(text)
  assert tasks[0] == TaskState("12", 3, "RUNNING", "", "None")
  assert [(t.index, t.state) for t in tasks[1:]] == [(4, "PENDING"), (5, "PENDING"), (6, "PENDING")]
  assert not tasks[1].done


def test_parse_sacct():
  text = "12_0|COMPLETED|0:0\n12_1|FAILED|3:0\n12_2|CANCELLED by 0|0:15\n12_[3-4]|PENDING|0:0\n"
  tasks = slurm.parse_sacct(text)
  assert [(t.index, t.state, t.done) for t in tasks] == [
    (0, "COMPLETED", True),
    (1, "FAILED", True),
    (2, "CANCELLED", True),
    (3, "PENDING", False),
    (4, "PENDING", False),
  ]
  assert tasks[1].exit_code == "3:0"


def test_parse_scontrol():
  text = (
    "JobId=13 ArrayJobId=12 ArrayTaskId=1 JobName=x JobState=FAILED Reason=NonZeroExitCode "
    "ExitCode=3:0 RunTime=00:00:03\n"
    "JobId=12 ArrayJobId=12 ArrayTaskId=2-3%1 ArrayTaskThrottle=1 JobState=PENDING "
    "Reason=JobArrayTaskLimit ExitCode=0:0\n"
  )
  tasks = slurm.parse_scontrol(text)
  assert tasks[0] == TaskState("12", 1, "FAILED", "3:0", "NonZeroExitCode")
  assert [(t.index, t.state) for t in tasks[1:]] == [(2, "PENDING"), (3, "PENDING")]


def _fake_bin(directory: Path, name: str, body: str) -> None:
  path = directory / name
  path.write_text("#!/bin/sh\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
  bindir = tmp_path / "bin"
  bindir.mkdir()
  monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
  return bindir


def test_submit_parses_parsable_output(fake_slurm, tmp_path):
  _fake_bin(fake_slurm, "sbatch", 'echo "$@" > "$(dirname "$0")/args"; echo "4242;cluster1"\n')
  script = tmp_path / "s.sbatch"
  script.write_text("#!/bin/bash\n")
  assert slurm.submit(script) == "4242"
  assert (fake_slurm / "args").read_text().split() == ["--parsable", str(script)]


def test_submit_errors(fake_slurm, tmp_path):
  _fake_bin(fake_slurm, "sbatch", 'echo "sbatch: error: invalid partition" >&2; exit 1\n')
  with pytest.raises(slurm.SlurmError, match="invalid partition"):
    slurm.submit(tmp_path / "s.sbatch")
  with pytest.raises(slurm.SlurmError, match="not found"):
    slurm.submit(tmp_path / "s.sbatch", sbatch="no-such-sbatch-binary")


def test_job_states_without_accounting_uses_scontrol_then_squeue(fake_slurm):
  _fake_bin(fake_slurm, "sacct", 'echo "Slurm accounting storage is disabled" >&2; exit 1\n')
  _fake_bin(
    fake_slurm,
    "scontrol",
    textwrap.dedent("""\
      echo "JobId=13 ArrayJobId=12 ArrayTaskId=0 JobState=COMPLETED ExitCode=0:0"
      echo "JobId=12 ArrayJobId=12 ArrayTaskId=1-2 JobState=PENDING ExitCode=0:0"
  """),
  )
  _fake_bin(fake_slurm, "squeue", 'echo "12_1|RUNNING|None"; echo "12_2|PENDING|Resources"\n')
  states = slurm.job_states(["12"])
  assert {k: t.state for k, t in states.items()} == {
    ("12", 0): "COMPLETED",
    ("12", 1): "RUNNING",
    ("12", 2): "PENDING",
  }


def test_job_states_with_accounting(fake_slurm):
  _fake_bin(fake_slurm, "sacct", 'echo "12_0|COMPLETED|0:0"; echo "12_1|TIMEOUT|0:0"\n')
  _fake_bin(fake_slurm, "squeue", 'echo "slurm_load_jobs error: Invalid job id" >&2; exit 1\n')
  states = slurm.job_states(["12"])
  assert states[("12", 1)].state == "TIMEOUT" and all(t.done for t in states.values())


# ------------------------------------------------------- flags and gin


def _parse_flags(argv):
  parser = argparse.ArgumentParser()
  slurm.add_arguments(parser)
  return parser.parse_args(argv)


def test_flags_override_gin(tmp_path):
  gin_file = tmp_path / "cluster.gin"
  gin_file.write_text(
    textwrap.dedent("""\
      from __gin__ import dynamic_registration
      import launch.slurm
      launch.slurm.SlurmResources.partition = 'gpu'
      launch.slurm.SlurmResources.gpus_per_node = 8
      launch.slurm.SlurmResources.time = '02:00:00'
      launch.slurm.SlurmResources.setup = ['module load cuda']
  """)
  )
  base = slurm.load_resources([str(gin_file)])
  assert (base.partition, base.gpus_per_node, base.time) == ("gpu", 8, "02:00:00")
  args = _parse_flags(
    [
      "--slurm_partition",
      "debug",
      "--slurm_mem",
      "16G",
      "--slurm_setup",
      "source .venv/bin/activate",
      "--slurm_option=--exclusive",
    ]
  )
  r = slurm.resources_from_args(args, base)
  assert (r.partition, r.gpus_per_node, r.time, r.mem) == ("debug", 8, "02:00:00", "16G")
  assert list(r.setup) == ["module load cuda", "source .venv/bin/activate"]
  assert list(r.sbatch_options) == ["--exclusive"]
  assert base.partition == "gpu"  # the gin value is not mutated


def test_no_gin_no_flags_is_defaults(tmp_path):
  assert slurm.load_resources() == SlurmResources()
  sweep_only = tmp_path / "sweep.gin"
  sweep_only.write_text(
    "from __gin__ import dynamic_registration\nimport launch.sweep\nlaunch.sweep.Sweep.name = 'x'\n"
  )
  # In a fresh process SlurmResources is in no registry until a file binds it.
  code = (
    "from launch import slurm; "
    f"print(slurm.load_resources([{str(sweep_only)!r}]) == slurm.SlurmResources())"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=Path(__file__).resolve().parent.parent,
  )
  assert out.stdout.strip() == "True", out.stderr
  r = slurm.resources_from_args(_parse_flags([]))
  assert r.partition is None and r.nodes == 1


def test_bad_flag_value_fails_early():
  with pytest.raises(ValueError, match="time"):
    slurm.resources_from_args(_parse_flags(["--slurm_time", "soon"]))


def test_format_status():
  from launch import slurm_sweep

  rows = [
    slurm_sweep.PointStatus(0, "kv-1__seed-0", "COMPLETED", "FINISHED", "12"),
    slurm_sweep.PointStatus(1, "kv-2__seed-0", "RUNNING", "RUNNING", "12"),
    slurm_sweep.PointStatus(2, "kv-4__seed-0", "-", "-"),
  ]
  text = slurm_sweep.format_status(rows)
  assert "12_1" in text and "3 points: 1 finished, 1 not submitted, 1 running" in text


def test_wait_times_out_with_states(fake_slurm, monkeypatch):
  _fake_bin(fake_slurm, "sacct", 'echo "12_0|RUNNING|0:0"\n')
  _fake_bin(fake_slurm, "squeue", 'echo "12_0|RUNNING|None"\n')
  start = time.monotonic()
  with pytest.raises(slurm.SlurmError, match="12_0=RUNNING"):
    slurm.wait(["12"], timeout_s=0.2, poll_s=0.05)
  assert time.monotonic() - start < 30


def test_job_states_of_forgotten_jobs_is_empty(fake_slurm):
  """Without accounting, jobs older than MinJobAge are unknown everywhere: nothing is active."""
  _fake_bin(fake_slurm, "sacct", 'echo "Slurm accounting storage is disabled" >&2; exit 1\n')
  _fake_bin(
    fake_slurm, "scontrol", 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1\n'
  )
  _fake_bin(
    fake_slurm, "squeue", 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1\n'
  )
  assert slurm.job_states(["12"]) == {}
  _fake_bin(
    fake_slurm, "squeue", 'echo "squeue: error: Unable to contact slurm controller" >&2; exit 1\n'
  )
  with pytest.raises(slurm.SlurmError, match="controller"):
    slurm.job_states(["12"])


def test_sweep_script_has_one_task_per_point(tmp_path):
  from launch import slurm_sweep
  from launch import sweep as sweep_lib

  sweep = sweep_lib.Sweep(
    name="s",
    base=["gin/experiments/tiny_llama.gin"],
    seeds=[0, 1],
    axes={"kv": {"binding": "core.model.config.ModelConfig.num_kv_heads", "values": [1, 2]}},
  )
  points = sweep_lib.expand(sweep)
  script = slurm_sweep.render_sweep_script(
    sweep,
    points,
    tracking_uri="http://10.0.0.1:5000",
    workdir=tmp_path,
    resources=SlurmResources(partition="gpu"),
    train_command=["ablax", "train"],
  )
  assert "#SBATCH --array=0-3" in script and "#SBATCH --job-name=ablax-s" in script
  assert f"#SBATCH --output={tmp_path.resolve()}/slurm/logs/%x-%A_%a.log" in script
  for p in points:
    line = next(l for l in script.splitlines() if l.startswith(f"  {p.index}) cmd=("))
    assert line.startswith(f"  {p.index}) cmd=(ablax train --gin_file ")
    assert f"--workdir {tmp_path.resolve() / p.key} --tracking_uri http://10.0.0.1:5000" in line
    assert f"num_kv_heads = {p.choices[0][1]}'" in line
  path = tmp_path / "s.sbatch"
  path.write_text(script)
  subprocess.run(["bash", "-n", str(path)], check=True)


def test_setup_lines_run_before_set_u(tmp_path):
  out = tmp_path / "out.txt"
  proc = _run_task(
    tmp_path,
    {0: ["sh", "-c", f"echo ran > {out}"]},
    0,
    resources=SlurmResources(setup=['echo "${NOT_SET_ANYWHERE}" > /dev/null']),
  )
  assert proc.returncode == 0, proc.stderr
  assert out.read_text() == "ran\n"
