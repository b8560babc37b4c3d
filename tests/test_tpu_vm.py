"""`ablax launch tpu-vm` command generation (nothing is run; no gcloud needed)."""

import argparse
import shlex

import pytest

from launch.commands import tpu_vm as tpu_vm_cmd
from launch.tpu_vm import ALL_WORKERS, LOCAL, TpuVm, build_steps, parse_env

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TRAIN = [
  "--gin_file",
  "gin/experiments/x.gin",
  "--gin_param",
  "train.steps = 10",
  "--workdir",
  "gs://bucket/runs/x",
]


def _command_of(step):
  """The remote shell command of a `gcloud ... ssh --command=...` step."""
  (flag,) = [a for a in step.argv if a.startswith("--command=")]
  return flag[len("--command=") :]


def test_tarball_flow():
  tpu = TpuVm("slice", "us-central2-b", project="proj")
  steps = build_steps(
    tpu,
    TRAIN,
    commit=COMMIT,
    jax_requirement="jax[tpu]==0.10.2",
    env={"MLFLOW_TRACKING_URI": "http://10.0.0.2:5000"},
  )
  assert [s.where for s in steps] == [LOCAL, LOCAL, ALL_WORKERS, ALL_WORKERS]
  archive, scp, setup, start = steps
  assert archive.argv[:2] == ("git", "-C") and archive.argv[3:5] == ("archive", "--format=tar.gz")
  assert archive.argv[-1] == COMMIT
  tarball = archive.argv[-2].removeprefix("--output=")
  assert tarball.endswith("ablax-0123456789ab.tar.gz")
  assert scp.argv == (
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "scp",
    tarball,
    "slice:ablax-0123456789ab.tar.gz",
    "--zone=us-central2-b",
    "--worker=all",
    "--project=proj",
  )
  assert setup.argv[:6] == ("gcloud", "compute", "tpus", "tpu-vm", "ssh", "slice")
  assert "--worker=all" in setup.argv and "--zone=us-central2-b" in setup.argv
  remote = _command_of(setup)
  assert "tar -xzf ablax-0123456789ab.tar.gz -C ablax" in remote
  assert "python3 -m venv .venv" in remote
  assert ".venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'" in remote
  run = _command_of(start)
  assert run.startswith(
    "cd ablax && ABLAX_DISTRIBUTED=auto MLFLOW_TRACKING_URI=http://10.0.0.2:5000 "
    ".venv/bin/ablax train "
  )
  # The train arguments survive the remote shell's word splitting unchanged.
  assert shlex.split(run.split(" train ", 1)[1]) == TRAIN


def test_printed_command_round_trips_through_a_shell():
  steps = build_steps(TpuVm("s", "z"), TRAIN, commit=COMMIT)
  for step in steps:
    assert tuple(shlex.split(step.shell())) == step.argv


def test_git_clone_flow():
  steps = build_steps(
    TpuVm("s", "z"), TRAIN, commit="v1.2", git_url="https://example.org/ablax.git"
  )
  assert [s.where for s in steps] == [ALL_WORKERS, ALL_WORKERS]
  remote = _command_of(steps[0])
  assert "git clone https://example.org/ablax.git ablax" in remote
  assert "checkout -q v1.2" in remote


def test_no_code_no_setup_is_one_step():
  steps = build_steps(TpuVm("s", "z", internal_ip=True), TRAIN, setup=False)
  assert len(steps) == 1 and "--internal-ip" in steps[0].argv
  assert "--project" not in " ".join(steps[0].argv)


def test_background_run_and_extra_requirements():
  steps = build_steps(
    TpuVm("s", "z"),
    TRAIN,
    commit=COMMIT,
    log_file="run.log",
    pip_extra=["psycopg2-binary==2.9.11"],
    remote_dir="work/ablax",
  )
  assert "'psycopg2-binary==2.9.11'" in _command_of(
    steps[2]
  ) or "psycopg2-binary==2.9.11" in _command_of(steps[2])
  run = _command_of(steps[-1])
  assert run.startswith("cd work/ablax && nohup env ABLAX_DISTRIBUTED=auto ")
  assert run.endswith("> run.log 2>&1 < /dev/null &")


def test_env_values_are_quoted():
  steps = build_steps(TpuVm("s", "z"), TRAIN, setup=False, env={"NOTE": "a b;rm -rf x"})
  assert "NOTE='a b;rm -rf x'" in _command_of(steps[0])


def test_needs_train_args():
  with pytest.raises(ValueError, match="train"):
    build_steps(TpuVm("s", "z"), [])


def test_parse_env():
  assert parse_env(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
  with pytest.raises(ValueError):
    parse_env(["no-equals"])


def _parse(argv):
  """As `ablax launch ARGV` parses it (launch/cli.py builds this parser)."""
  parser = argparse.ArgumentParser(prog="ablax launch")
  tpu_vm_cmd.add_arguments(parser)
  return parser.parse_args(argv)


def test_cli_prints_without_running(capsys, monkeypatch):
  args = _parse(
    [
      "tpu-vm",
      "slice",
      "--zone",
      "europe-west4-a",
      "--commit",
      COMMIT,
      "--tracking_uri",
      "http://10.1.1.1:5000",
      "--env",
      "XLA_FLAGS=--x",
      "--",
      *TRAIN,
    ]
  )
  ran = []
  monkeypatch.setattr(tpu_vm_cmd.subprocess, "run", lambda *a, **k: ran.append(a))
  assert tpu_vm_cmd.run(args) == 0
  assert not ran
  out = capsys.readouterr().out
  assert "# local: archive commit 0123456789ab" in out
  assert "--worker=all" in out and "MLFLOW_TRACKING_URI=http://10.1.1.1:5000" in out
  assert "XLA_FLAGS=--x" in out


def test_cli_execute_stops_at_first_failure(monkeypatch, capsys):
  args = _parse(["tpu-vm", "slice", "--zone", "z", "--commit", COMMIT, "--execute", "--", *TRAIN])
  ran = []

  class Done:
    def __init__(self, code):
      self.returncode = code

  def fake_run(argv, *a, **k):
    ran.append(argv)
    return Done(0 if len(ran) < 2 else 255)

  monkeypatch.setattr(tpu_vm_cmd.subprocess, "run", fake_run)
  assert tpu_vm_cmd.run(args) == 255
  assert len(ran) == 2 and ran[1][4] == "scp"


def test_cli_options_after_the_name_and_missing_train_args(capsys):
  args = tpu_vm_cmd.parse_tpu_vm_args(
    ["slice", "--zone", "z", "--no_code", "--", "--workdir", "w", "--", "x"]
  )
  assert args.name == "slice" and args.no_code and args.train_args == ["--workdir", "w", "--", "x"]
  assert tpu_vm_cmd.run(_parse(["tpu-vm", "slice", "--zone", "z", "--no_code"])) == 2
  assert "train" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    tpu_vm_cmd.run(_parse(["tpu-vm", "-h"]))


def test_through_the_ablax_dispatcher(monkeypatch, capsys):
  """As `ablax launch tpu-vm ...` once launch/cli.py lists the command."""
  from launch import cli

  monkeypatch.setitem(
    cli.COMMANDS,
    "launch",
    (
      "launch.commands.tpu_vm",
      "start a run on other machines (tpu-vm: every worker of a pod slice)",
    ),
  )
  code = cli.main(
    [
      "launch",
      "tpu-vm",
      "slice",
      "--zone",
      "z",
      "--no_code",
      "--no_setup",
      "--",
      "--gin_file",
      "gin/experiments/tiny_llama.gin",
    ]
  )
  assert code == 0
  assert "gcloud compute tpus tpu-vm ssh slice" in capsys.readouterr().out
