"""`ablax tracking sync`: upload what of a run's workdir the store does not have, like `wandb sync`.

    ablax tracking sync runs/tiny_llama                    # to the store the run logged to
    ablax tracking sync runs/tiny_llama --tracking_uri http://host:5000
    ablax tracking sync runs/attention                     # every point of a sweep's workdir

A trainer records everything in its workdir first (metrics.jsonl, run.json,
record/) and uploads it from a persisted offset (core/tracking/sync.py); when
its store was unreachable, the rest waits there, and its next start uploads it.
This uploads it without training, through the same syncer, to the run named in
`<workdir>/run.json`, final status included. It refuses a workdir a trainer
holds (that trainer uploads its own record) and holds the lock itself meanwhile.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
  sync = sub.add_parser(
    "sync",
    help="upload what a run's (or a sweep's runs') workdir holds and its MLflow store does not",
  )
  sync.add_argument("workdir", help="a run's workdir, or a sweep's (every point in it)")
  sync.add_argument(
    "--tracking_uri",
    default=None,
    help="the store to deliver to (default: the one in WORKDIR/run.json)",
  )


def run(args: argparse.Namespace) -> int:
  os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
  if args.action == "sync":
    return sync(Path(args.workdir), args.tracking_uri)
  return 2


def run_dirs(workdir: Path) -> list[Path]:
  """The workdir itself when it is a run's, else the runs' directories directly in it."""
  from core.tracking import schema  # pylint: disable=g-import-not-at-top

  if (workdir / schema.RUN_FILE).is_file():
    return [workdir]
  return sorted(d for d in workdir.iterdir() if (d / schema.RUN_FILE).is_file())


def sync(workdir: Path, tracking_uri: str | None = None) -> int:
  """0: everything delivered (or nothing to deliver); 1: records remain; 2: not a run's workdir."""
  if not workdir.is_dir():
    print(f"ablax tracking sync: {workdir} is not a directory", file=sys.stderr)
    return 2
  dirs = run_dirs(workdir)
  if not dirs:
    print(
      f"ablax tracking sync: {workdir} holds no run (no run.json in it or in its subdirectories)",
      file=sys.stderr,
    )
    return 2
  rc = 0
  for run_dir in dirs:
    rc = max(rc, _sync_one(run_dir, tracking_uri))
  return rc


def _sync_one(run_dir: Path, tracking_uri: str | None) -> int:
  from core.tracking import local, schema, sync as syncing  # pylint: disable=g-import-not-at-top
  from core.train import workdir_lock  # pylint: disable=g-import-not-at-top

  record = local.read_run_file(run_dir)
  run_id = record.get(schema.RUN_ID_KEY)
  uri = tracking_uri or record.get(schema.TRACKING_URI_KEY)
  if not run_id or not uri:
    print(f"{run_dir}: run.json names no MLflow run; nothing to deliver")
    return 0
  waiting = syncing.Syncer(run_dir, run_id).pending()
  if not waiting:
    print(f"{run_dir}: nothing to deliver (run {run_id})")
    return 0
  lock = workdir_lock.WorkdirLock(run_dir)
  try:
    lock.acquire(wait_s=0)
  except workdir_lock.WorkdirBusyError as e:
    print(
      f"{run_dir}: not delivered: {e}; its trainer delivers the {waiting} records itself",
      file=sys.stderr,
    )
    return 1
  try:
    return _deliver(run_dir, uri, run_id, waiting)
  finally:
    lock.release()


def _deliver(run_dir: Path, uri: str, run_id: str, waiting: int) -> int:
  from core.tracking import sync as syncing  # pylint: disable=g-import-not-at-top
  from core.tracking.store import bound_http_retries  # pylint: disable=g-import-not-at-top
  from mlflow.exceptions import MlflowException  # pylint: disable=g-import-not-at-top
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top

  bound_http_retries(uri, 10, 2)  # an unreachable store answers in seconds, not minutes
  client = MlflowClient(uri)
  syncer = syncing.Syncer(run_dir, run_id, client)
  try:
    client.get_run(run_id)
  except MlflowException as e:
    if e.get_http_status_code() == 404 or "not found" in str(e).lower():
      print(
        f"{run_dir}: run {run_id} is not in {uri}; {waiting} records kept in {run_dir}",
        file=sys.stderr,
      )
      return 1
    return _unreachable(run_dir, uri, e, waiting)
  except Exception as e:  # noqa: BLE001  unreachable: say so, keep the records
    return _unreachable(run_dir, uri, e, waiting)
  try:
    sent = syncer.sync()
  except Exception as e:  # noqa: BLE001  the store went away mid-way: the rest waits
    return _unreachable(run_dir, uri, e, syncer.pending())
  rejected = syncer.state["rejected"]
  note = (
    f"; the store refused {len(rejected)} (noted in {run_dir / syncing.STATE_FILE})"
    if rejected
    else ""
  )
  print(f"{run_dir}: delivered {sent} records of run {run_id} to {uri}{note}")
  return 0


def _unreachable(run_dir: Path, uri: str, error: BaseException, left: int) -> int:
  text = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
  print(
    f"{run_dir}: store {uri} unreachable ({type(error).__name__}: {text}); {left} records "
    f"kept in {run_dir}; run this again when it answers",
    file=sys.stderr,
  )
  return 1
