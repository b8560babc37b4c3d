"""A sweep as a SLURM job array: submit, resubmit, and report progress.

The glue between `ablax sweep` (launch/sweep.py, launch/sweep_runner.py) and
the SLURM launcher (launch/slurm.py). A submission creates each unfinished
point's MLflow run under the sweep's parent run, as the local runner does,
writes the array script under `<workdir>/slurm/`, submits it, and records the
job id on the parent run (tags `ablax.slurm.job_ids`, `ablax.slurm.array`, the
script as an artifact) and in `<workdir>/slurm.json`. Submitting again sends
only the points that are neither finished nor queued or running. `--status`
lists each point's SLURM state next to its MLflow status, marks runs whose
task ended without ending them FAILED, and ends the parent run once no task is
left.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from core.tracking import schema

from launch.slurm import (
  ARRAY_TAG,
  DONE_STATES,
  JOB_IDS_TAG,
  STATE_FILE,
  SlurmError,
  SlurmResources,
  TaskState,
  format_indices,
  job_states,
  load_resources,
  render_array_script,
  resources_from_args,
  submit,
)


@dataclasses.dataclass
class Submission:
  job_id: str
  indices: list[int]
  script: str


def load_state(workdir: Path) -> dict[str, Any]:
  path = Path(workdir) / STATE_FILE
  return json.loads(path.read_text()) if path.is_file() else {"submissions": []}


def _save_state(workdir: Path, state: Mapping[str, Any]) -> None:
  path = Path(workdir) / STATE_FILE
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(state, indent=2))
  tmp.replace(path)


def _commands(
  sweep: Any,
  points: Sequence[Any],
  *,
  workdir: Path,
  tracking_uri: str,
  train_command: Sequence[str] | None,
) -> dict[int, list[str]]:
  from launch import sweep_runner

  prefix = tuple(train_command or sweep_runner.TRAIN_COMMAND)
  return {
    p.index: sweep_runner.child_command(
      p, sweep, workdir=workdir, tracking_uri=tracking_uri, prefix=prefix
    )
    for p in points
  }


def render_sweep_script(
  sweep: Any,
  points: Sequence[Any],
  *,
  tracking_uri: str,
  workdir: str | os.PathLike,
  resources: SlurmResources,
  train_command: Sequence[str] | None = None,
  env: Mapping[str, str] | None = None,
) -> str:
  """The sbatch script for `points` of `sweep` (no MLflow writes, nothing submitted)."""
  workdir = Path(workdir).resolve()
  commands = _commands(
    sweep, points, workdir=workdir, tracking_uri=tracking_uri, train_command=train_command
  )
  run_env = {"MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
  return render_array_script(
    commands,
    resources,
    job_name=f"ablax-{sweep.name}",
    log_dir=workdir / "slurm" / "logs",
    chdir=Path.cwd(),
    env=run_env,
    labels={p.index: f"{p.key} ({p.variant})" for p in points},
  )


def submit_sweep(
  sweep: Any,
  points: Sequence[Any],
  *,
  tracking_uri: str,
  parent_run_id: str,
  workdir: str | os.PathLike,
  resources: SlurmResources,
  train_command: Sequence[str] | None = None,
  env: Mapping[str, str] | None = None,
  sbatch: str = "sbatch",
) -> Submission | None:
  """Submits the sweep's unfinished points as one job array; None when nothing is left.

  Points whose child run is FINISHED, and points still queued or running from
  an earlier submission, are left out, so submitting again resumes a sweep.
  Each point's MLflow run is created first (launch/sweep_runner.prepare_child),
  as the local runner does, and the trainer continues it from `run.json`.
  """
  from launch import sweep_runner

  workdir = Path(workdir).resolve()
  slurm_dir = workdir / "slurm"
  (slurm_dir / "logs").mkdir(parents=True, exist_ok=True)
  state = load_state(workdir)
  done = sweep_runner.finished_points(tracking_uri, parent_run_id)
  active: set[int] = set()
  previous = [s["job_id"] for s in state["submissions"]]
  if previous:
    active = {t.index for t in job_states(previous).values() if not t.done}
  todo = [p for p in points if p.key not in done and p.index not in active]
  if not todo:
    return None
  for p in todo:
    sweep_runner.prepare_child(
      sweep, p, workdir=workdir, tracking_uri=tracking_uri, parent_run_id=parent_run_id
    )
  script = render_sweep_script(
    sweep,
    todo,
    tracking_uri=tracking_uri,
    workdir=workdir,
    resources=resources,
    train_command=train_command,
    env=env,
  )
  script_path = slurm_dir / f"array-{len(state['submissions']):03d}.sbatch"
  script_path.write_text(script)
  job_id = submit(script_path, sbatch=sbatch)
  submission = Submission(job_id, [p.index for p in todo], str(script_path))
  state["submissions"].append(
    {**dataclasses.asdict(submission), "submitted_at": time.time(), "parent_run_id": parent_run_id}
  )
  _save_state(workdir, state)
  record_submission(tracking_uri, parent_run_id, submission)
  return submission


def record_submission(tracking_uri: str, parent_run_id: str, submission: Submission) -> None:
  """Appends the job id to the parent run's tags and keeps the script as an artifact."""
  from launch import sweep_runner

  client = sweep_runner.client(tracking_uri)
  tags = client.get_run(parent_run_id).data.tags
  ids = [i for i in tags.get(JOB_IDS_TAG, "").split(",") if i]
  if submission.job_id not in ids:
    ids.append(submission.job_id)
  arrays = [a for a in tags.get(ARRAY_TAG, "").split(" ") if a]
  arrays.append(f"{submission.job_id}:{format_indices(submission.indices)}")
  client.set_tag(parent_run_id, JOB_IDS_TAG, ",".join(ids)[:8000])
  client.set_tag(parent_run_id, ARRAY_TAG, " ".join(arrays)[-8000:])
  client.set_tag(parent_run_id, schema.LAUNCHER, "slurm")
  client.log_artifact(parent_run_id, submission.script, f"slurm/{submission.job_id}")


@dataclasses.dataclass(frozen=True)
class PointStatus:
  index: int
  key: str
  slurm: str  # latest SLURM state of the point's task, '-' if never submitted
  mlflow: str  # status of its newest child run, '-' if none
  job: str = ""


def sweep_status(
  points: Sequence[Any],
  *,
  tracking_uri: str,
  parent_run_id: str,
  workdir: str | os.PathLike | None = None,
  settle: bool = True,
) -> list[PointStatus]:
  """Per point: the SLURM state of its newest task and the status of its MLflow run.

  With `settle`, a run left RUNNING by a task SLURM reports ended (killed at
  the time limit, node failure, cancelled while starting) is marked FAILED, as
  the local runner does when a child process exits.
  """
  from launch import sweep_runner

  state = load_state(Path(workdir)) if workdir else {"submissions": []}
  job_ids = [s["job_id"] for s in state["submissions"]]
  if not job_ids:
    tags = sweep_runner.client(tracking_uri).get_run(parent_run_id).data.tags
    job_ids = [i for i in tags.get(JOB_IDS_TAG, "").split(",") if i]
  try:
    states = job_states(job_ids)
  except SlurmError:
    states = {}
  latest: dict[int, TaskState] = {}
  order = {job: n for n, job in enumerate(job_ids)}
  for (job, index), task in sorted(states.items(), key=lambda kv: order.get(kv[0][0], -1)):
    latest[index] = task  # later submissions win
  runs: dict[str, Any] = {}
  for run in sweep_runner.child_runs(tracking_uri, parent_run_id):  # newest first
    key = run.data.tags.get(sweep_runner.POINT_TAG)
    if key and (key not in runs or run.info.status == "FINISHED"):
      runs[key] = run  # a finished run of a point wins over a newer failed one
  out = []
  for p in points:
    task, run = latest.get(p.index), runs.get(p.key)
    status = run.info.status if run else "-"
    if settle and task is not None and task.done and status == "RUNNING":
      status = sweep_runner.settle_child(tracking_uri, run.info.run_id, 1)
    out.append(
      PointStatus(p.index, p.key, task.state if task else "-", status, task.job_id if task else "")
    )
  return out


def format_status(rows: Sequence[PointStatus]) -> str:
  counts: dict[str, int] = {}
  for r in rows:
    label = (
      "finished"
      if r.mlflow == "FINISHED"
      else (r.slurm.lower() if r.slurm != "-" else "not submitted")
    )
    counts[label] = counts.get(label, 0) + 1
  width = max([len(r.key) for r in rows] + [5])
  lines = [f"{'#':>3}  {'point':<{width}}  {'slurm':<13} {'mlflow':<9} job"]
  lines += [
    f"{r.index:>3}  {r.key:<{width}}  {r.slurm:<13} {r.mlflow:<9} "
    f"{r.job + '_' + str(r.index) if r.job else ''}"
    for r in rows
  ]
  lines.append(f"{len(rows)} points: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
  return "\n".join(lines)


def settle_parent(rows: Sequence[PointStatus], *, tracking_uri: str, parent_run_id: str) -> str:
  """Ends the parent run once no task is queued or running; returns its status.

  FINISHED when every point's run finished, FAILED otherwise (a later
  submission of the same sweep reopens it).
  """
  from launch import sweep_runner

  active = [
    r for r in rows if r.slurm not in DONE_STATES and r.slurm != "-" and r.mlflow != "FINISHED"
  ]
  if active:
    return "RUNNING"
  status = "FINISHED" if all(r.mlflow == "FINISHED" for r in rows) else "FAILED"
  sweep_runner.close_parent(tracking_uri, parent_run_id, status)
  return status


# ------------------------------------------------- `ablax sweep` entry


def sweep_main(args: Any, sweep: Any, points: Sequence[Any]) -> int:
  """`ablax sweep --launcher slurm` (submit) and `ablax sweep --status` (progress).

  Called by launch/commands/sweep.py after the sweep file is loaded and every point
  validated. Uses its flags: tracking_uri, workdir, dry_run, train_command,
  status, slurm_* (see `add_arguments`).
  """
  from launch import gin_config, sweep_runner
  from analysis import runs as runs_lib

  tracking_uri = args.tracking_uri or runs_lib.default_tracking_uri()
  workdir = Path(args.workdir or Path("runs") / sweep.name).resolve()
  train_command = args.train_command.split() if getattr(args, "train_command", None) else None
  if getattr(args, "status", False):
    return _print_status(points, workdir, tracking_uri if args.tracking_uri else None)
  try:
    resources = resources_from_args(
      args, load_resources([args.sweep_file, *getattr(args, "slurm_gin", [])], args.gin_param)
    )
  except (ValueError, gin_config.GinConfigError) as e:
    print(f"ablax sweep: SLURM resources: {e}", file=sys.stderr)
    return 2
  if args.dry_run:
    print(
      render_sweep_script(
        sweep,
        points,
        tracking_uri=tracking_uri,
        workdir=workdir,
        resources=resources,
        train_command=train_command,
      )
    )
    return 0
  if tracking_uri.startswith("sqlite:"):
    print(
      "ablax sweep: note: tasks on several nodes writing one sqlite file over a network "
      "filesystem can lose records; a shared `mlflow server` is safer "
      "(deploy/mlflow_postgres/README.md)",
      file=sys.stderr,
    )
  try:
    parent_id = sweep_runner.open_parent(sweep, points, tracking_uri, workdir)
    submission = submit_sweep(
      sweep,
      points,
      tracking_uri=tracking_uri,
      parent_run_id=parent_id,
      workdir=workdir,
      resources=resources,
      train_command=train_command,
    )
  except SlurmError as e:
    print(f"ablax sweep: {e}", file=sys.stderr)
    return 1
  except ValueError as e:  # SweepError and bad resources
    print(f"ablax sweep: {e}", file=sys.stderr)
    return 2
  if submission is None:
    print(f"parent run {parent_id}: nothing to submit (every point finished, queued or running)")
  else:
    print(
      f"parent run {parent_id} in {tracking_uri}: submitted SLURM job array "
      f"{submission.job_id} ({len(submission.indices)} points, indices "
      f"{format_indices(submission.indices)}); script {submission.script}; logs in "
      f"{workdir / 'slurm' / 'logs'}"
    )
  flags = "" if args.workdir is None else f" --workdir {shlex.quote(str(args.workdir))}"
  print(f"Progress:  ablax sweep {shlex.quote(args.sweep_file)}{flags} --status")
  return 0


def _print_status(points: Sequence[Any], workdir: Path, tracking_uri: str | None) -> int:
  from launch import sweep_runner

  state_path = workdir / sweep_runner.STATE_FILE
  if not state_path.is_file():
    print(
      f"ablax sweep: no sweep has run in {workdir} (pass the --workdir it used)", file=sys.stderr
    )
    return 2
  recorded = json.loads(state_path.read_text())
  uri = tracking_uri or recorded["tracking_uri"]
  parent_id = recorded["parent_run_id"]
  rows = sweep_status(points, tracking_uri=uri, parent_run_id=parent_id, workdir=workdir)
  print(f"parent run {parent_id} in {uri}")
  print(format_status(rows))
  if load_state(workdir)["submissions"]:
    print(f"parent run: {settle_parent(rows, tracking_uri=uri, parent_run_id=parent_id)}")
  return 0
