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

from launch import parent_watch

DEFAULT_RUNS_DIR = "runs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[], required=True,
                      help="gin file (repeatable; later files win)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding, e.g. 'core.train.loop.train.num_steps = 50' (repeatable)")
  parser.add_argument("--workdir", default=None,
                      help="run directory; an existing one is resumed "
                           f"(default: {DEFAULT_RUNS_DIR}/<name of the last gin file>)")
  parser.add_argument("--tracking_uri", default=None,
                      help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                           "sqlite:///runs/mlflow.db, the store every ablax command uses)")
  parser.add_argument("--no_tracking", action="store_true", help="do not log to MLflow")
  parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)


def _jax_detects_cluster() -> bool:
  """Whether JAX's own detection would find a cluster (Open MPI, Cloud TPU, ...)."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types)  # noqa: SLF001
  except Exception:  # noqa: BLE001  private API: without it, single-process unless told
    return False


def _input_errors() -> tuple[type[BaseException], ...]:
  from core.data.errors import DataError  # pylint: disable=g-import-not-at-top
  from core.model.config import ConfigError  # pylint: disable=g-import-not-at-top
  from core.model.io import ModelIOError  # pylint: disable=g-import-not-at-top
  from core.tokenizer import TokenizerError  # pylint: disable=g-import-not-at-top
  from core.tracking.carbon import CarbonInputError  # pylint: disable=g-import-not-at-top
  from core.tracking.store import TrackingStoreError  # pylint: disable=g-import-not-at-top
  return (ConfigError, DataError, TokenizerError, CarbonInputError, TrackingStoreError,
          ModelIOError)


def run(args: argparse.Namespace) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
  parent_watch.start()  # a sweep's child stops when its sweep is gone
  from launch import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize_from(args, detected=_jax_detects_cluster)
  except distributed.DistributedConfigError as e:
    print(f"ablax train: {e}", file=sys.stderr)
    return 2

  import gin  # pylint: disable=g-import-not-at-top
  from core.train import loop  # pylint: disable=g-import-not-at-top
  from launch import gin_config  # pylint: disable=g-import-not-at-top

  try:
    files = gin_config.parse(args.gin_file, args.gin_param)
  except gin_config.GinConfigError as e:
    print(f"ablax train: {e}", file=sys.stderr)
    return 2
  workdir = Path(args.workdir or Path(DEFAULT_RUNS_DIR) / Path(args.gin_file[-1]).stem)

  def config_hook(run_dir: Path) -> loop.RunConfigRecord:
    paths = gin_config.write_configs(run_dir)
    bindings = gin_config.operative_bindings()
    return loop.RunConfigRecord(files=[paths["config"], paths["operative_config"]],
                                params=gin_config.binding_params(bindings),
                                text=gin.operative_config_str(), bound_text=gin.config_str(),
                                gin_files=files, config_hash=gin_config.bindings_hash(bindings))

  overrides = {"workdir": workdir, "config_hook": config_hook, "tracking_uri": args.tracking_uri}
  env_experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME")
  if env_experiment and _bound(gin, "experiment") in (None, BASE_EXPERIMENT):
    # MLflow's variable names the experiment of runs whose gin files name none.
    overrides["experiment"] = env_experiment
  if args.no_tracking:
    overrides["track"] = False
  try:
    result = gin_config.build(loop.train, files, **overrides)
  except gin_config.GinConfigError as e:
    print(f"ablax train: {e}", file=sys.stderr)
    return 2
  except loop.WorkdirBusyError as e:
    print(f"ablax train: {e}", file=sys.stderr)
    return 1
  except (loop.NonFiniteError, loop.CheckpointWriteError) as e:
    print(f"ablax train: stopped: {e}", file=sys.stderr)
    return 1
  except _input_errors() as e:
    # Bad input (config, data, tokenizer, carbon inputs, tracking store): the
    # message says what to change; a traceback would only hide it.
    print(f"ablax train: {type(e).__name__}: {e}", file=sys.stderr)
    return 2
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
