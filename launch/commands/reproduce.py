"""`ablax reproduce RUN_ID`: re-run an MLflow run from its recorded config and compare the curves.

  ablax reproduce 3f2a...                  # new run in the same experiment, tagged ablax.reproduces
  ablax reproduce 3f2a... --rtol 1e-6      # accept tiny differences (another machine or library)

Fetches the run's operative config (`config/operative_config.gin`) and data
manifest from MLflow, warns where the code version or the environment differs
from the original's tags, trains the same config into a new workdir as a new
run linked to the original, and reports whether every loss curve matches:
identical on the same machine and code, else the largest relative difference.
Exit status: 0 when the curves match (within --rtol), 1 when not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from analysis import reproduce as repro
from analysis import runs as runs_lib
from core.errors import UserError
from core.tracking import schema
from core.train import tracking as train_tracking
from launch import sweep_runner


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("run_id", help="the MLflow run to reproduce")
  parser.add_argument(
    "--tracking_uri",
    default=None,
    help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)",
  )
  parser.add_argument(
    "--workdir",
    default=None,
    help="workdir of the re-run (default: runs/reproduce/<run id>-<time>)",
  )
  parser.add_argument(
    "--rtol",
    type=float,
    default=0.0,
    help="largest relative difference that still counts as a match (default 0: bit for bit)",
  )
  parser.add_argument("--train_command", default=None, help=argparse.SUPPRESS)


class ReproduceError(UserError, RuntimeError):
  """The run cannot be reproduced (missing run or config); raised before training."""


def fetch(c, run_id: str, dest: Path) -> tuple[object, Path, dict | None]:
  """The run, its operative config file and its data manifest (None when not recorded)."""
  try:
    run = runs_lib.get_run(c, run_id)
  except runs_lib.RunLookupError as e:
    raise ReproduceError(str(e)) from None
  dest.mkdir(parents=True, exist_ok=True)
  config = _download(c, run_id, schema.OPERATIVE_CONFIG_ARTIFACT, dest)
  if config is None:
    listed = [f.path for f in c.list_artifacts(run_id)]
    raise ReproduceError(
      f"run {run_id} has no operative config artifact ({schema.OPERATIVE_CONFIG_ARTIFACT};"
      f" it has {listed or 'no artifacts'}): it was not recorded by `ablax train`, or it "
      f"failed before its configuration was logged"
    )
  manifest_path = _download(c, run_id, schema.DATA_MANIFEST_ARTIFACT, dest)
  manifest = json.loads(manifest_path.read_text()) if manifest_path else None
  return run, config, manifest


def _download(c, run_id: str, path: str, dest: Path) -> Path | None:
  """The run's artifact `path` (as core.tracking.record writes it), downloaded into `dest`."""
  from mlflow.exceptions import MlflowException

  try:
    names = {f.path for f in c.list_artifacts(run_id, str(Path(path).parent))}
  except (MlflowException, OSError):
    return None
  return Path(c.download_artifacts(run_id, path, str(dest))) if path in names else None


def current_tags() -> dict[str, str]:
  """The code and environment tags a run started now would get.

  The run-record tags (core/tracking/record.py), the only ones a run carries.
  """
  tags: dict[str, str] = {}
  try:
    from core.paths import REPO_ROOT  # pylint: disable=g-import-not-at-top
    from core.tracking import record  # pylint: disable=g-import-not-at-top

    tags.update(record.run_tags(record.code_version(REPO_ROOT), record.environment(), None))
  except Exception as e:  # noqa: BLE001  a missing check is reported, not fatal
    print(
      f"ablax reproduce: cannot read all of this machine's code/environment ({e})", file=sys.stderr
    )
  return tags


def print_differences(diffs: dict[str, list], when: str) -> None:
  for kind in ("code", "environment"):
    for key, old, new in diffs[kind]:
      print(
        f"WARNING: {kind} differs {when}: {key}: {old!r} (original) vs {new!r}", file=sys.stderr
      )


def run(args: argparse.Namespace) -> int:
  tracking_uri = args.tracking_uri or runs_lib.default_tracking_uri()
  c = runs_lib.client(tracking_uri)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  workdir = Path(args.workdir or Path("runs") / "reproduce" / f"{args.run_id}-{stamp}").resolve()
  if (workdir / sweep_runner.TRAINER_RUN_FILE).exists():
    print(
      f"ablax reproduce: {workdir} already holds a run; choose another --workdir", file=sys.stderr
    )
    return 2
  try:
    original, config, manifest = fetch(c, args.run_id, workdir / "original")
    _check_config(config)
  except ReproduceError as e:
    print(f"ablax reproduce: {e}", file=sys.stderr)
    return 2
  if manifest is None:
    print(
      "WARNING: the original recorded no data manifest; the data cannot be checked", file=sys.stderr
    )
  print_differences(repro.tag_differences(original.data.tags, current_tags()), "now")

  new_id = _create_run(c, original, workdir, tracking_uri)
  print(f"reproducing run {args.run_id} as run {new_id} in {workdir}", flush=True)
  env = dict(os.environ)
  for key, value in original.data.tags.items():
    if key.startswith(sweep_runner.ENV_TAG_PREFIX):
      env[key[len(sweep_runner.ENV_TAG_PREFIX) :]] = value  # same threads as the original
  prefix = args.train_command.split() if args.train_command else list(sweep_runner.TRAIN_COMMAND)
  cores = original.data.tags.get(sweep_runner.CPU_COUNT_TAG)
  if cores and cores.isdigit():
    # As many cores as the original's worker: XLA sizes its CPU thread pools by them.
    prefix = sweep_runner.pin_command(prefix, sweep_runner.available_cpus()[: int(cores)])
  cmd = prefix + [
    "--gin_file",
    str(config),
    "--workdir",
    str(workdir),
    "--tracking_uri",
    tracking_uri,
  ]
  rc = subprocess.call(cmd, env=env)
  status = sweep_runner.settle_child(tracking_uri, new_id, rc)
  if status != "FINISHED":
    print(f"ablax reproduce: the re-run ended {status} (exit {rc}); run {new_id}", file=sys.stderr)
    return 1

  report = repro.compare_histories(c, args.run_id, new_id, args.rtol)
  rerun = runs_lib.get_run(c, new_id)
  diffs = repro.tag_differences(original.data.tags, rerun.data.tags)
  print_differences(diffs, "in the re-run")
  new_manifest_path = _download(c, new_id, schema.DATA_MANIFEST_ARTIFACT, workdir / "rerun")
  new_manifest = json.loads(new_manifest_path.read_text()) if new_manifest_path else None
  data_diffs = (
    repro.dict_differences(manifest, new_manifest)
    if manifest is not None and new_manifest is not None
    else []
  )
  for line in data_diffs[:20]:
    print(f"WARNING: data manifest differs: {line}", file=sys.stderr)
  _print_report(report)
  c.set_tag(
    new_id,
    schema.REPRODUCE_RESULT,
    "identical" if report.identical else ("match" if report.matches else "different"),
  )
  c.set_tag(new_id, schema.REPRODUCE_MAX_REL_DIFF, f"{report.max_rel_diff:.6g}")
  c.log_text(
    new_id,
    json.dumps(
      {
        "original": args.run_id,
        "rerun": new_id,
        "summary": report.summary(),
        "metrics": [vars(m) for m in report.metrics],
        "tag_differences": diffs,
        "data_manifest_differences": data_diffs,
      },
      indent=2,
      default=str,
    ),
    "reproduce/report.json",
  )
  print(f"\n{report.summary()}\noriginal {args.run_id} -> re-run {new_id}")
  print(f"Open the UI:    {runs_lib.ui_command(tracking_uri)}")
  return 0 if report.matches else 1


def _check_config(config: Path) -> None:
  """The fetched config must parse with this code before anything trains."""
  import gin  # pylint: disable=g-import-not-at-top
  from launch import gin_config  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  try:
    gin_config.parse([config], finalize=True)
  except gin_config.GinConfigError as e:
    raise ReproduceError(f"the recorded config no longer parses with this code: {e}") from None
  finally:
    gin.clear_config()


def _create_run(c, original, workdir: Path, tracking_uri: str) -> str:
  """The new run, tagged with the original, handed to the trainer through run.json."""
  experiment = c.get_experiment(original.info.experiment_id)
  name = f"{original.info.run_name or original.info.run_id[:8]}-reproduce"
  tags = {
    runs_lib.REPRODUCES_TAG: original.info.run_id,
    schema.NOTE: f"Re-run of run {original.info.run_id} from its recorded "
    f"operative config (`ablax reproduce`).",
  }
  run = c.create_run(original.info.experiment_id, tags=tags, run_name=name)
  train_tracking.write_run_file(workdir, run.info.run_id, tracking_uri, experiment.name)
  return run.info.run_id


def _print_report(report: repro.Report) -> None:
  print(f"\n{'metric':<24} {'steps':>6} {'identical':>9} {'max rel diff':>13}")
  for m in report.metrics:
    missing = f"  missing steps {m.missing_steps[:5]}" if m.missing_steps else ""
    print(f"{m.key:<24} {m.steps:>6} {str(m.identical):>9} {m.max_rel_diff:>13.3e}{missing}")
