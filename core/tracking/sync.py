"""The one way a run reaches MLflow: from its workdir, from where the last upload stopped.

`Syncer(workdir, run_id, client).sync()` sends what the workdir holds and the
store does not yet: the journal's lines past the persisted offset (batched
into `log_batch` calls within MLflow's limits), the params, tags and dataset
inputs of run.json, the listed artifacts that changed, then the final status.
Each step of it is recorded in `<workdir>/mlflow_sync.json` only after the
store took it:

  {"run_id": "...",              the run the rest refers to (another run: start over)
   "metrics_offset": 123456,     bytes of metrics.jsonl in the store
   "record": {"params": sha, "tags": sha, "inputs": sha},   of what was sent
   "artifacts": {"record/environment.json": [size, mtime_ns], ...},
   "status": ["FINISHED", end_time_ms] | null,
   "rejected": [[from_byte, to_byte, error], ...]}   lines the store refused (4xx)

So a store that is unreachable only means the offset does not advance; the
trainer's thread, its next start and `ablax tracking sync WORKDIR` all call
this, and each (metric, step) is sent once. A crash between an upload and its
offset repeats that upload, which the store ignores (an identical metric is
kept once, params and tags are set to the same value, a file is overwritten).
The status goes last, so a run marked FINISHED in the store has all of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from core.tracking import journal, local
from core.tracking.store import (
  MAX_METRICS_PER_BATCH,
  MAX_PARAM_VALUE,
  MAX_PARAMS_TAGS_PER_BATCH,
  MAX_TAG_VALUE,
  clean_key,
  is_transient,
  truncate,
)

logger = logging.getLogger(__name__)

STATE_FILE = "mlflow_sync.json"


class Syncer:
  """Uploads one workdir's record to one MLflow run; `client` None only counts what waits."""

  def __init__(self, workdir: str | os.PathLike, run_id: str, client: Any = None):
    self.workdir = Path(workdir)
    self.run_id = run_id
    self.client = client
    self.delivered_batches = 0  # log_batch calls the store took (tests, diagnostics)
    self.state = self._read_state()

  def _read_state(self) -> dict:
    path = self.workdir / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {}
    if state.get("run_id") != self.run_id:
      state = {
        "run_id": self.run_id,
        "metrics_offset": 0,
        "record": {},
        "artifacts": {},
        "status": None,
        "rejected": [],
      }
    return state

  def _save(self) -> None:
    local.write_json(self.workdir / STATE_FILE, self.state)

  # -------------------------------------------------------------- what waits

  def pending(self) -> int:
    """Records the store does not have: journal lines, record parts, artifacts, the status."""
    run = local.read_run_file(self.workdir)
    lines = sum(
      1 for _ in journal.read(self.workdir / journal.METRICS_FILE, self.state["metrics_offset"])
    )
    record = sum(
      1
      for kind, value in self._record_parts(run).items()
      if value and self.state["record"].get(kind) != _digest(value)
    )
    return lines + record + len(self._changed_artifacts(run)) + int(self._status_due(run))

  def _record_parts(self, run: dict) -> dict[str, Any]:
    return {k: run.get(k) for k in (local.PARAMS, local.TAGS, local.INPUTS)}

  def _changed_artifacts(
    self, run: dict, changed: bool = True
  ) -> list[tuple[str, str | None, list[int]]]:
    """Listed artifacts never uploaded, and (`changed`) those that changed since."""
    out = []
    for rel, artifact_path in run.get(local.ARTIFACTS, []):
      path = self.workdir / rel
      if not path.exists():
        continue
      stamp = _stamp(path)
      uploaded = self.state["artifacts"].get(rel)
      if uploaded is None or (changed and uploaded != stamp):
        out.append((rel, artifact_path, stamp))
    return out

  def _status_due(self, run: dict) -> bool:
    status = run.get(local.STATUS)
    return bool(status) and self.state["status"] != [status, run.get(local.END_TIME)]

  # ------------------------------------------------------------------ sync

  def sync(self, changed_artifacts: bool = True) -> int:
    """Sends everything that waits; returns how many records it sent.

    `changed_artifacts=False` leaves artifacts uploaded before and changed
    since (a growing metrics.jsonl) for a later call.

    Raises the store's error when it is unreachable (what was sent before it
    stays sent); refusals (4xx) are noted in the state file and skipped.
    """
    run = local.read_run_file(self.workdir)
    sent = (
      self._sync_metrics() + self._sync_record(run) + self._sync_artifacts(run, changed_artifacts)
    )
    if self._status_due(run) and (changed_artifacts or not self._changed_artifacts(run)):
      self._call(
        lambda: self.client.set_terminated(self.run_id, run[local.STATUS], run.get(local.END_TIME))
      )
      self.state["status"] = [run[local.STATUS], run.get(local.END_TIME)]
      self._save()
      sent += 1
    return sent

  def _sync_metrics(self) -> int:
    from mlflow.entities import Metric  # pylint: disable=g-import-not-at-top

    path = self.workdir / journal.METRICS_FILE
    lines = 0
    batch: list = []
    start = end = self.state["metrics_offset"]
    for offset, line in journal.read(path, start):
      step, stamp = int(line.get("step", 0)), int(line.get("time", 0))
      metrics = [
        Metric(clean_key(k), float(v), stamp, step)
        for k, v in journal.metrics_of(line).items()
        if isinstance(v, (int, float))
      ]
      if batch and len(batch) + len(metrics) > MAX_METRICS_PER_BATCH:
        self._send_metrics(batch, start, end)
        start, batch = end, []
      # A line of more metrics than a batch holds goes in several; its offset moves after the last.
      while len(metrics) > MAX_METRICS_PER_BATCH:
        self._send_metrics(metrics[:MAX_METRICS_PER_BATCH], start, None)
        metrics = metrics[MAX_METRICS_PER_BATCH:]
      batch += metrics
      end = offset
      lines += 1
    if end > start or batch:
      self._send_metrics(batch, start, end)
    return lines

  def _send_metrics(self, metrics: list, start: int, end: int | None) -> None:
    """One log_batch; then the offset moves to `end` (None: the line is not done yet)."""
    if metrics:
      self._call(
        lambda: self.client.log_batch(self.run_id, metrics=metrics, synchronous=True), start, end
      )
      self.delivered_batches += 1
    if end is not None:
      self.state["metrics_offset"] = end
      self._save()

  def _sync_record(self, run: dict) -> int:
    from mlflow.entities import Param, RunTag  # pylint: disable=g-import-not-at-top

    sent = 0
    for kind, value in self._record_parts(run).items():
      digest = _digest(value)
      if not value or self.state["record"].get(kind) == digest:
        continue
      if kind == local.INPUTS:
        self._call(lambda: self._log_inputs(value))
      else:
        items = sorted(value.items())
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
          chunk = items[i : i + MAX_PARAMS_TAGS_PER_BATCH]
          if kind == local.PARAMS:
            entities = {"params": [Param(k, truncate(v, MAX_PARAM_VALUE)) for k, v in chunk]}
          else:
            entities = {"tags": [RunTag(k, truncate(v, MAX_TAG_VALUE)) for k, v in chunk]}
          self._call(lambda: self.client.log_batch(self.run_id, synchronous=True, **entities))
      self.state["record"][kind] = digest
      self._save()
      sent += 1
    return sent

  def _log_inputs(self, datasets: list[dict[str, str]]) -> None:
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = [
      DatasetInput(
        MetaDataset(
          CodeDatasetSource({"source": d["source"]}), name=d["name"], digest=d["digest"]
        )._to_mlflow_entity(),
        tags=[InputTag("mlflow.data.context", d.get("context", "train"))],
      )
      for d in datasets
    ]
    self.client.log_inputs(self.run_id, datasets=inputs)

  def _sync_artifacts(self, run: dict, changed_artifacts: bool) -> int:
    changed = self._changed_artifacts(run, changed_artifacts)
    for rel, artifact_path, stamp in changed:
      path = self.workdir / rel
      upload = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
      self._call(lambda: upload(self.run_id, str(path), artifact_path))
      self.state["artifacts"][rel] = stamp
      self._save()
    return len(changed)

  def _call(self, fn, start: int | None = None, end: int | None = None) -> None:
    """Runs one upload; a refusal (4xx) is noted and skipped, anything else raises."""
    try:
      fn()
    except Exception as e:  # noqa: BLE001  classified here
      if is_transient(e):
        raise
      logger.error(
        "the tracking store refused part of run %s (%s); noted in %s",
        self.run_id,
        str(e)[:300],
        self.workdir / STATE_FILE,
      )
      self.state["rejected"].append([start, end, str(e)[:2000]])


def _digest(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _stamp(path: Path) -> list[int]:
  if path.is_dir():
    files = [p for p in path.rglob("*") if p.is_file()]
    return [
      sum(p.stat().st_size for p in files),
      max((p.stat().st_mtime_ns for p in files), default=0),
    ]
  st = path.stat()
  return [st.st_size, st.st_mtime_ns]
