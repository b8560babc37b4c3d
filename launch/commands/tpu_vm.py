"""`ablax launch tpu-vm`: start one run on every worker of a Cloud TPU pod slice.

A pod slice is several TPU VMs (workers), each running one JAX process; the
run only starts when every worker runs the same command. This command writes
those commands, with `gcloud compute tpus tpu-vm` (Google Cloud CLI):

1. local: `git archive` the commit to run into a tarball (the exact code that
   the run records, never the untracked files of the working tree);
2. local: `gcloud compute tpus tpu-vm scp TARBALL NAME: --worker=all`;
3. every worker: unpack, create `.venv`, `pip install -e . jax[tpu]==<jax>`;
4. every worker: `ABLAX_DISTRIBUTED=auto .venv/bin/ablax train ...`.

`ABLAX_DISTRIBUTED=auto` makes `ablax train` call `jax.distributed.initialize()`
without arguments, so JAX reads coordinator, worker count and worker id from
the TPU VM metadata server (launch/distributed.py). Commands are printed;
`--execute` runs them in order and stops at the first failure. With
`--git_url`, workers clone the repository instead of receiving a tarball.

Usage:
  ablax launch tpu-vm my-slice --zone us-central2-b [--project P] \\
      [--tracking_uri http://10.0.0.2:5000] [--env K=V ...] [--execute] \\
      -- --gin_file gin/experiments/X.gin --workdir /tmp/runs/x
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Sequence

from core.paths import REPO_ROOT
from launch.tpu_vm import TpuVm, build_steps, jax_tpu_requirement, parse_env

TARGETS = ("tpu-vm",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  # Two stages: argparse cannot mix a sub-command's options with a `--`-separated
  # tail of another command's arguments, so the tail is split off by hand.
  parser.add_argument("target", choices=TARGETS, help="where to launch: tpu-vm")
  parser.add_argument(
    "rest",
    nargs=argparse.REMAINDER,
    help="options of the target, then `--` and `ablax train` arguments",
  )


def tpu_vm_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="ablax launch tpu-vm",
    description=__doc__.split("\n\n")[0],
    epilog="`ablax train` arguments follow `--`.",
  )
  p.add_argument("name", help="TPU VM (pod slice) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default=None)
  p.add_argument("--internal_ip", action="store_true", help="ssh over the internal network")
  p.add_argument("--commit", default=None, help="commit to run (default: HEAD of this checkout)")
  p.add_argument(
    "--git_url",
    default=None,
    help="clone this repository on the workers instead of copying a tarball",
  )
  p.add_argument(
    "--no_code", action="store_true", help="the workers already have the code in --remote_dir"
  )
  p.add_argument("--no_setup", action="store_true", help="skip venv creation and pip install")
  p.add_argument("--remote_dir", default="ablax", help="checkout on the workers (under ~)")
  p.add_argument("--pip", action="append", default=[], help="extra requirement (repeatable)")
  p.add_argument(
    "--tracking_uri",
    default=None,
    help="MLflow server all workers reach (default: MLFLOW_TRACKING_URI if http)",
  )
  p.add_argument(
    "--env",
    action="append",
    default=[],
    metavar="NAME=VALUE",
    help="environment of the run (repeatable)",
  )
  p.add_argument(
    "--log_file", default=None, help="run in the background, output to this file on each worker"
  )
  p.add_argument("--execute", action="store_true", help="run the commands (default: print)")
  return p


def parse_tpu_vm_args(rest: Sequence[str]) -> argparse.Namespace:
  rest = list(rest)
  cut = rest.index("--") if "--" in rest else len(rest)
  args = tpu_vm_parser().parse_args(rest[:cut])
  args.train_args = rest[cut + 1 :]
  return args


def _head_commit() -> str:
  out = subprocess.run(
    ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
  )
  dirty = subprocess.run(
    ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
    capture_output=True,
    text=True,
  ).stdout
  if dirty.strip():
    print(
      "ablax launch: uncommitted changes are not shipped; the workers run "
      f"{out.stdout.strip()[:12]}",
      file=sys.stderr,
    )
  return out.stdout.strip()


def run(args: argparse.Namespace) -> int:
  if getattr(args, "target", "tpu-vm") != "tpu-vm":
    raise ValueError(f"unknown launch target {args.target!r}")
  if not hasattr(args, "name"):
    args = parse_tpu_vm_args(args.rest)
  train_args = list(args.train_args)
  try:
    env = parse_env(args.env)
  except ValueError as e:
    print(f"ablax launch tpu-vm: {e}", file=sys.stderr)
    return 2
  tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
  if tracking_uri.startswith(("http://", "https://")):
    env.setdefault("MLFLOW_TRACKING_URI", tracking_uri)
  else:
    print(
      "ablax launch: no http(s) MLflow server given (--tracking_uri); process 0 logs to "
      "a store on worker 0",
      file=sys.stderr,
    )
  commit = None if args.no_code else (args.commit or (None if args.git_url else _head_commit()))
  try:
    steps = build_steps(
      TpuVm(args.name, args.zone, args.project, args.internal_ip),
      train_args,
      commit=commit,
      git_url=None if args.no_code else args.git_url,
      remote_dir=args.remote_dir,
      env=env,
      setup=not args.no_setup,
      pip_extra=args.pip,
      jax_requirement=jax_tpu_requirement(),
      log_file=args.log_file,
    )
  except ValueError as e:
    print(f"ablax launch tpu-vm: {e}", file=sys.stderr)
    return 2
  for step in steps:
    print(f"# {step.where}: {step.purpose}")
    print(step.shell())
    if args.execute:
      code = subprocess.run(list(step.argv)).returncode
      if code:
        print(f"ablax launch: step failed with exit status {code}: {step.purpose}", file=sys.stderr)
        return code
  return 0
