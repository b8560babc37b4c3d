"""The run record kept in the workdir, which the store receives from (core/tracking/sync.py).

  <workdir>/run.json       the MLflow run (id, store, experiment), its params, tags, dataset
                           inputs, the artifacts to upload, and its final status
  <workdir>/metrics.jsonl  every logged metric (core/tracking/journal.py)
  <workdir>/record/        artifacts that are no file of the workdir: texts the run produced
                           (environment, code version, diff, ...) and copies of files from
                           outside it (gin files), laid out as in the store

Files of the workdir itself (metrics.jsonl, config files) are uploaded as they
are when synced, not copied. run.json is replaced atomically at each change.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from core.tracking import schema

RECORD_DIR = "record"
PARAMS, TAGS, INPUTS, ARTIFACTS = "params", "tags", "inputs", "artifacts"
STATUS, END_TIME = "status", "end_time"
STATUSES = ("FINISHED", "FAILED", "KILLED")

_lock = threading.Lock()  # run.json: read-modify-write from the trainer and its sync thread


def read_run_file(workdir: str | os.PathLike) -> dict:
  path = Path(workdir) / schema.RUN_FILE
  return json.loads(path.read_text()) if path.is_file() else {}


def update_run_file(workdir: str | os.PathLike, **values: Any) -> dict:
  """Sets top-level keys of run.json; a mapping value is merged into the one already there."""
  with _lock:
    record = read_run_file(workdir)
    for key, value in values.items():
      if isinstance(value, Mapping) and isinstance(record.get(key), Mapping):
        record[key] = {**record[key], **value}
      else:
        record[key] = value
    write_json(Path(workdir) / schema.RUN_FILE, record)
    return record


def write_json(path: Path, obj: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def add_artifact(
  workdir: str | os.PathLike, local_path: str | os.PathLike, artifact_path: str | None
) -> None:
  """Lists a file or directory for upload to `artifact_path` (None: the run's root).

  One of the workdir is uploaded as it is when synced; one from elsewhere is
  copied into record/ now, so the run keeps what it logged.
  """
  workdir = Path(workdir).resolve()
  src = Path(local_path).resolve()
  if not src.exists():
    raise FileNotFoundError(f"artifact {src} does not exist")
  if workdir not in src.parents:
    dest = workdir / RECORD_DIR / (artifact_path or "") / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
      shutil.copytree(src, dest, dirs_exist_ok=True)
    else:
      shutil.copy2(src, dest)
    src = dest
  rel = str(src.relative_to(workdir))
  with _lock:
    record = read_run_file(workdir)
    listed = record.setdefault(ARTIFACTS, [])
    if [rel, artifact_path] not in listed:
      listed.append([rel, artifact_path])
      write_json(workdir / schema.RUN_FILE, record)


def write_text(workdir: str | os.PathLike, text: str, artifact_file: str) -> None:
  """An artifact of the run's own making: record/<artifact_file>, listed for upload."""
  path = Path(workdir) / RECORD_DIR / artifact_file
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  parent = str(Path(artifact_file).parent)
  add_artifact(workdir, path, None if parent in ("", ".") else parent)


def end(workdir: str | os.PathLike, status: str) -> None:
  if status not in STATUSES:
    raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
  update_run_file(workdir, **{STATUS: status, END_TIME: int(time.time() * 1000)})
