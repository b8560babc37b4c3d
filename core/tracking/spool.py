"""The local spool: records that could not reach the tracking store yet.

A spool is one JSON-lines file per run, `<spool_dir>/<run_id>.jsonl`, written in
the order records were logged and replayed in that order. Each line is one
record:

  {"kind": "batch", "metrics": [[key, value, timestamp_ms, step], ...],
   "params": {...}, "tags": {...}}
  {"kind": "artifact", "local_path": ..., "artifact_path": ...}
  {"kind": "terminate", "status": "FINISHED", "end_time": ms}

Replaying a line twice is harmless: MLflow drops a metric identical in key,
value, timestamp and step, params and tags are re-set to the same value and an
artifact is overwritten. So a crash between sending a line and removing it
from the file duplicates nothing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator


def spool_path(spool_dir: str | os.PathLike, run_id: str) -> Path:
  return Path(spool_dir) / f"{run_id}.jsonl"


def _encode(value: Any) -> Any:
  # JSON has no NaN/inf; MLflow accepts them as metric values, so keep them.
  if isinstance(value, float) and not math.isfinite(value):
    return {"float": repr(value)}
  return value


def _decode(value: Any) -> Any:
  if isinstance(value, dict) and "float" in value:
    return float(value["float"])
  return value


def encode_record(record: dict[str, Any]) -> str:
  if record.get("kind") == "batch":
    record = dict(record, metrics=[[k, _encode(v), t, s] for k, v, t, s in record["metrics"]])
  return json.dumps(record, sort_keys=True)


def decode_record(line: str) -> dict[str, Any]:
  record = json.loads(line)
  if record.get("kind") == "batch":
    record["metrics"] = [[k, _decode(v), t, s] for k, v, t, s in record["metrics"]]
  return record


def append(spool_dir: str | os.PathLike, run_id: str, records: list[dict[str, Any]]) -> None:
  """Appends records and forces them to disk before returning."""
  path = spool_path(spool_dir, run_id)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    for record in records:
      f.write(encode_record(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def pending(spool_dir: str | os.PathLike, run_id: str) -> int:
  path = spool_path(spool_dir, run_id)
  if not path.exists():
    return 0
  with open(path, encoding="utf-8") as f:
    return sum(1 for line in f if line.strip())


def read(spool_dir: str | os.PathLike, run_id: str) -> Iterator[dict[str, Any]]:
  path = spool_path(spool_dir, run_id)
  if not path.exists():
    return
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        yield decode_record(line)


def replay(spool_dir: str | os.PathLike, run_id: str,
           send: Callable[[dict[str, Any]], None]) -> int:
  """Sends spooled records in order; returns how many were sent.

  Stops at the first record `send` raises on and keeps it and everything after
  it in the file (the exception propagates). The file is rewritten atomically,
  so an interrupted replay never loses a line.
  """
  path = spool_path(spool_dir, run_id)
  if not path.exists():
    return 0
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  sent = 0
  try:
    for line in lines:
      send(decode_record(line))
      sent += 1
  finally:
    rest = lines[sent:]
    if not rest:
      path.unlink(missing_ok=True)
    elif sent:
      tmp = path.with_suffix(".jsonl.tmp")
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(rest)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
  return sent
