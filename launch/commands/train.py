"""`ablax train`: parse gin files and bindings, join the other processes, run core.train.loop.train.

    ablax train --gin_file gin/experiments/tiny_llama.gin [--gin_param 'A.b = 1'] [--workdir DIR]

Running the same command with the same workdir resumes the run from its newest
checkpoint. Multi-process: give --coordinator_address/--num_processes/
--process_id (or ABLAX_COORDINATOR / JAX_COORDINATOR_ADDRESS, ABLAX_NUM_PROCESSES /
JAX_NUM_PROCESSES, ABLAX_PROCESS_ID / JAX_PROCESS_ID); under `srun` (SLURM) and on
clusters JAX detects (Open MPI, Cloud TPU...) nothing is needed (launch/distributed.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from launch import gin_config
from launch import parent_watch

DEFAULT_RUNS_DIR = "runs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  gin_config.add_arguments(parser, required=True, files_help="gin file of the run")
  parser.add_argument(
    "--workdir",
    default=None,
    help="run directory; an existing one is resumed "
    f"(default: {DEFAULT_RUNS_DIR}/<name of the last gin file>)",
  )
  parser.add_argument(
    "--tracking_uri",
    default=None,
    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
    "sqlite:///runs/mlflow.db, the store every ablax command uses)",
  )
  parser.add_argument("--no_tracking", action="store_true", help="do not log to MLflow")
  parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
  parser.add_argument(
    "--num_processes",
    type=int,
    default=None,
    help="processes in the run, one per host (default: detected, else 1)",
  )
  parser.add_argument(
    "--process_id",
    type=int,
    default=None,
    help="this process's index in [0, num_processes) (default: detected)",
  )


def _jax_detects_cluster() -> bool:
  """Whether JAX's own detection would find a cluster (Open MPI, Cloud TPU, ...)."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top

    return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types)  # noqa: SLF001
  except Exception:  # noqa: BLE001  private API: without it, single-process unless told
    return False


def run(args: argparse.Namespace) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
  parent_watch.start()  # a sweep's child stops when its sweep is gone
  from launch import distributed  # pylint: disable=g-import-not-at-top

  # Bad input (flags, gin, config, data, tokenizer, workdir, checkpoints, carbon
  # inputs, tracking store) raises a core.errors.UserError, which launch/cli.py
  # prints as one line naming the cause.
  distributed.initialize_from(args, detected=_jax_detects_cluster)

  import gin  # pylint: disable=g-import-not-at-top
  from core.errors import one_line  # pylint: disable=g-import-not-at-top
  from core.train import loop  # pylint: disable=g-import-not-at-top

  files = gin_config.parse_args(args)
  workdir = Path(args.workdir or Path(DEFAULT_RUNS_DIR) / Path(args.gin_file[-1]).stem)

  def config_hook(run_dir: Path) -> loop.RunConfigRecord:
    gin_config.write_configs(run_dir)
    bindings = gin_config.operative_bindings()
    return loop.RunConfigRecord(
      params=gin_config.binding_params(bindings),
      text=gin.operative_config_str(),
      bound_text=gin.config_str(),
      gin_files=files,
      config_hash=gin_config.bindings_hash(bindings),
    )

  overrides = {"workdir": workdir, "config_hook": config_hook, "tracking_uri": args.tracking_uri}
  env_experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME")
  if env_experiment and _bound(gin, "experiment") in (None, BASE_EXPERIMENT):
    # MLflow's variable names the experiment of runs whose gin files name none.
    overrides["experiment"] = env_experiment
  if args.no_tracking:
    overrides["track"] = False
  try:
    result = gin_config.build(loop.train, files, **overrides)
  except loop.WorkdirBusyError as e:
    print(f"ablax train: {one_line(e)}", file=sys.stderr)
    return 1
  except (loop.NonFiniteError, loop.CheckpointWriteError) as e:
    print(f"ablax train: stopped: {one_line(e)}", file=sys.stderr)
    return 1
  if result.status == "KILLED":
    print(f"ablax train: stopped by SIGTERM at step {result.step}; the same command resumes it")
  if result.run_id:
    from analysis import runs as runs_lib  # pylint: disable=g-import-not-at-top
    from core.train import tracking as train_tracking  # pylint: disable=g-import-not-at-top

    uri = train_tracking.read_run_file(workdir).get("tracking_uri")
    print(f"MLflow run {result.run_id} in {uri}\nOpen the UI:    {runs_lib.ui_command(uri)}")
  return 0


# What gin/train/base.gin names the experiment when a run's files name none.
BASE_EXPERIMENT = "ablax"


def _bound(gin, name: str):
  try:
    return gin.query_parameter(f"core.train.loop.train.{name}")
  except ValueError:
    return None
