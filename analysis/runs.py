"""Reading runs back from MLflow: sweeps, their children, metric histories.

Everything here reads the tracking store only, never a run's workdir, so a
comparison works on any machine that can reach the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Iterable, Sequence

from core.errors import UserError
from core.tracking import schema

# Tags a sweep writes (launch/sweep_runner.py) and the analysis reads: core.tracking.schema's.
PARENT_TAG = schema.PARENT
SWEEP_TAG = schema.SWEEP_NAME
ROLE_TAG = schema.SWEEP_ROLE
HASH_TAG = schema.SWEEP_HASH
POINT_TAG = schema.SWEEP_POINT
VARIANT_TAG = schema.SWEEP_VARIANT
SEED_TAG = schema.SWEEP_SEED
INDEX_TAG = schema.SWEEP_INDEX
BASELINE_TAG = schema.SWEEP_BASELINE
METRIC_TAG = schema.SWEEP_METRIC
REPRODUCES_TAG = schema.REPRODUCES

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class RunLookupError(UserError, LookupError):
  """A run, sweep or experiment that is not in the store; the message says what was looked for."""


def default_tracking_uri() -> str:
  """$MLFLOW_TRACKING_URI, else the project store `./runs/mlflow.db` (core.tracking.store)."""
  from core.tracking.store import default_tracking_uri as default  # pylint: disable=g-import-not-at-top

  return default()


def client(tracking_uri: str | None = None):
  os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
  os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
  from mlflow.tracking import MlflowClient

  return MlflowClient(tracking_uri or default_tracking_uri())


def ui_command(tracking_uri: str) -> str:
  """The shell command that opens the MLflow UI on this store (credentials left out)."""
  from core.tracking.store import public_uri  # pylint: disable=g-import-not-at-top

  return f"mlflow ui --backend-store-uri {public_uri(tracking_uri)}"


def _all_experiment_ids(c) -> list[str]:
  from mlflow.entities import ViewType

  return [e.experiment_id for e in c.search_experiments(view_type=ViewType.ACTIVE_ONLY)]


def search(
  c,
  experiment_ids: Sequence[str],
  filter_string: str = "",
  order_by: Sequence[str] = ("attributes.start_time DESC",),
) -> list:
  """All matching runs (every page), newest first."""
  runs, token = [], None
  while True:
    page = c.search_runs(
      list(experiment_ids),
      filter_string=filter_string,
      order_by=list(order_by),
      max_results=1000,
      page_token=token,
    )
    runs.extend(page)
    token = page.token
    if not token:
      return runs


def get_run(c, run_id: str):
  """The run, or RunLookupError naming the store."""
  from mlflow.exceptions import MlflowException

  try:
    return c.get_run(run_id)
  except MlflowException as e:
    raise RunLookupError(f"run {run_id!r} not found in {c.tracking_uri}") from e


def find_sweep(c, name_or_run_id: str):
  """The sweep's parent run: by run id, else the newest parent run tagged with that name."""
  if _RUN_ID.match(name_or_run_id):
    run = get_run(c, name_or_run_id)
    if run.data.tags.get(ROLE_TAG) != "parent" and not _children_exist(c, run):
      raise RunLookupError(f"run {name_or_run_id} is not a sweep (no child runs)")
    return run
  runs = search(
    c,
    _all_experiment_ids(c),
    f"tags.`{SWEEP_TAG}` = '{name_or_run_id}' and tags.`{ROLE_TAG}` = 'parent'",
  )
  if not runs:
    names = sorted(
      {
        r.data.tags.get(SWEEP_TAG)
        for r in search(c, _all_experiment_ids(c), f"tags.`{ROLE_TAG}` = 'parent'")
      }
      - {None}
    )
    known = f"; sweeps in this store: {', '.join(names)}" if names else "; it has no sweeps"
    raise RunLookupError(f"no sweep named {name_or_run_id!r} in {c.tracking_uri}{known}")
  return runs[0]


def _children_exist(c, run) -> bool:
  return bool(search(c, [run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{run.info.run_id}'"))


def sweep_children(c, parent, finished_only: bool = True) -> list:
  """One run per grid point (the newest, FINISHED unless finished_only=False)."""
  runs = search(c, [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
  chosen: dict[str, Any] = {}
  for run in runs:
    if finished_only and run.info.status != "FINISHED":
      continue
    key = run.data.tags.get(POINT_TAG) or run.info.run_id
    chosen.setdefault(key, run)
  return list(chosen.values())


def experiment_runs(c, experiment: str, filter_string: str = "") -> list:
  exp = c.get_experiment_by_name(experiment)
  if exp is None:
    raise RunLookupError(f"no experiment named {experiment!r} in {c.tracking_uri}")
  return [r for r in search(c, [exp.experiment_id], filter_string) if r.info.status == "FINISHED"]


def variant_of(run, group_by: Sequence[str] = ()) -> str:
  """The run's variant: its sweep point without the seed, or the values of `group_by` params."""
  if group_by:
    return ",".join(f"{k}={run.data.params.get(k, run.data.tags.get(k, '?'))}" for k in group_by)
  return run.data.tags.get(VARIANT_TAG) or run.info.run_name or run.info.run_id


def seed_of(run) -> str | None:
  return run.data.tags.get(SEED_TAG) or run.data.params.get("seed")


def config_hash(run) -> str:
  """The hash the trainer recorded; else a hash of the run's params (the flattened config)."""
  from core.tracking import schema  # pylint: disable=g-import-not-at-top

  if run.data.tags.get(schema.CONFIG_HASH):
    return run.data.tags[schema.CONFIG_HASH]
  skip = {"seed"}
  text = json.dumps({k: v for k, v in sorted(run.data.params.items()) if k not in skip})
  return "params:" + hashlib.sha256(text.encode()).hexdigest()[:12]


def _order(run):
  """Grid order: the sweep's point index, else the start time."""
  try:
    index = int(run.data.tags.get(INDEX_TAG, ""))
  except ValueError:
    index = 1 << 62
  return (index, run.info.start_time or 0, run.info.run_id)


def group(runs: Iterable, group_by: Sequence[str] = ()) -> dict[str, list]:
  """variant -> runs, variants in grid order (the baseline first when it is first), runs by seed."""
  groups: dict[str, list] = {}
  for run in sorted(runs, key=_order):
    groups.setdefault(variant_of(run, group_by), []).append(run)
  for runs_ in groups.values():
    runs_.sort(key=lambda r: (_seed_key(seed_of(r)), r.info.run_id))
  return groups


def _seed_key(seed: str | None):
  try:
    return (0, int(seed))
  except (TypeError, ValueError):
    return (1, str(seed))


@dataclasses.dataclass(frozen=True)
class Point:
  step: int
  value: float
  timestamp: int


def history(c, run_id: str, key: str) -> list[Point]:
  """A metric's history sorted by step (the last value logged wins at a repeated step)."""
  by_step: dict[int, Point] = {}
  for m in sorted(c.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
    by_step[m.step] = Point(m.step, m.value, m.timestamp)
  return [by_step[s] for s in sorted(by_step)]


def pick_metric(run, candidates: Sequence[str]) -> str | None:
  """The first candidate metric the run logged."""
  for key in candidates:
    if key in run.data.metrics:
      return key
  return None
