"""Cloud TPU pod slices: the commands that start one run on every worker.

See launch/commands/tpu_vm.py (`ablax launch tpu-vm`) for the steps and the usage.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import Mapping, Sequence

from core.paths import REPO_ROOT

LOCAL, ALL_WORKERS = "local", "all workers"


@dataclasses.dataclass(frozen=True)
class Step:
  """One command of a launch: where it runs, what it is for, and its argv."""

  where: str
  purpose: str
  argv: tuple[str, ...]

  def shell(self) -> str:
    return shlex.join(self.argv)


@dataclasses.dataclass(frozen=True)
class TpuVm:
  name: str
  zone: str
  project: str | None = None
  internal_ip: bool = False

  def gcloud(self, verb: str, *args: str, worker: str = "all") -> tuple[str, ...]:
    argv = [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      verb,
      *args,
      f"--zone={self.zone}",
      f"--worker={worker}",
    ]
    if self.project:
      argv.append(f"--project={self.project}")
    if self.internal_ip:
      argv.append("--internal-ip")
    return tuple(argv)


def jax_tpu_requirement() -> str:
  """The `jax[tpu]` pin matching the local jax, so workers run what was tested."""
  from importlib.metadata import PackageNotFoundError, version

  try:
    return f"jax[tpu]=={version('jax')}"
  except PackageNotFoundError:
    return "jax[tpu]"


def build_steps(
  tpu: TpuVm,
  train_args: Sequence[str],
  *,
  commit: str | None = None,
  git_url: str | None = None,
  remote_dir: str = "ablax",
  env: Mapping[str, str] | None = None,
  setup: bool = True,
  pip_extra: Sequence[str] = (),
  jax_requirement: str = "jax[tpu]",
  log_file: str | None = None,
  repo_root: Path = REPO_ROOT,
  python: str = "python3",
) -> list[Step]:
  """The commands that start `ablax train TRAIN_ARGS` on every worker of `tpu`.

  Args:
    tpu: the TPU VM (pod slice) to run on.
    train_args: arguments of `ablax train` (gin files, bindings, workdir).
    commit: commit to ship as a tarball (ignored with `git_url`); None with no
      `git_url` skips shipping code, for workers that already have it.
    git_url: clone this repository on every worker and check out `commit`.
    remote_dir: checkout on the workers, relative to the home directory.
    env: extra environment of the run (e.g. MLFLOW_TRACKING_URI).
    setup: create the workers' virtual environment and install the package.
    pip_extra: more requirements to install on the workers.
    jax_requirement: the JAX TPU requirement, e.g. 'jax[tpu]==0.10.2'.
    log_file: run in the background with output here (relative to
      `remote_dir`), so the run outlives the ssh session; None runs in the
      foreground and gcloud streams every worker's output.
  """
  if not train_args:
    raise ValueError("no `ablax train` arguments given (put them after `--`)")
  steps: list[Step] = []
  q = shlex.quote
  prepare: list[str] = []
  if git_url:
    prepare.append(f"(test -d {q(remote_dir)}/.git || git clone {q(git_url)} {q(remote_dir)})")
    if commit:
      prepare.append(
        f"git -C {q(remote_dir)} fetch -q origin && git -C {q(remote_dir)} checkout -q {q(commit)}"
      )
  elif commit:
    tarball = f"ablax-{commit[:12]}.tar.gz"
    local_tarball = str(Path(os.environ.get("TMPDIR", "/tmp")) / tarball)
    steps.append(
      Step(
        LOCAL,
        f"archive commit {commit[:12]}",
        (
          "git",
          "-C",
          str(repo_root),
          "archive",
          "--format=tar.gz",
          f"--output={local_tarball}",
          commit,
        ),
      )
    )
    steps.append(
      Step(
        LOCAL,
        "copy the code to every worker",
        tpu.gcloud("scp", local_tarball, f"{tpu.name}:{tarball}"),
      )
    )
    prepare.append(f"mkdir -p {q(remote_dir)} && tar -xzf {q(tarball)} -C {q(remote_dir)}")
  if setup:
    requirements = " ".join(q(r) for r in ("-e", ".", jax_requirement, *pip_extra))
    prepare.append(
      f"cd {q(remote_dir)} && (test -d .venv || {q(python)} -m venv .venv) && "
      f".venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q "
      f"{requirements}"
    )
  if prepare:
    steps.append(
      Step(
        ALL_WORKERS,
        "unpack and install on every worker",
        tpu.gcloud(
          "ssh", tpu.name, "--command=" + "set -e; " + "; ".join(f"cd && {p}" for p in prepare)
        ),
      )
    )

  run_env = {"ABLAX_DISTRIBUTED": "auto", **(env or {})}
  assignments = " ".join(f"{k}={q(v)}" for k, v in run_env.items())
  train = f"{assignments} .venv/bin/ablax train {shlex.join(train_args)}"
  if log_file:
    train = f"nohup env {train} > {q(log_file)} 2>&1 < /dev/null &"
  steps.append(
    Step(
      ALL_WORKERS,
      "start the run on every worker",
      tpu.gcloud("ssh", tpu.name, f"--command=cd {q(remote_dir)} && {train}"),
    )
  )
  return steps


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
  env = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not key.isidentifier():
      raise ValueError(f"--env {pair!r}: expected NAME=VALUE")
    env[key] = value
  return env
