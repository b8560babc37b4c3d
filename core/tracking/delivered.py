"""What a resumed run already delivered, so each (metric, step) reaches the store once.

A run killed after its checkpoint at step C had usually logged steps past C
already (into the store or its spool). Resumed from C, it computes those steps
again; logging them again would give the store two points per step. So on
resume the trainer reads what the run holds from step C on, and drops each
(metric, step) already there. The first value stays: a curve in the store
never changes after it was drawn.

The recomputed value of a deterministic metric (loss, norms, learning rate,
token and FLOP counts, held-out metrics: same batches, RNG and compiled step)
should equal what was delivered; where it does not, the difference is printed
with metric, step and both values, since it means the resumed run is not the
run that was interrupted. Timing, energy and system metrics differ from one
process to the next by nature and are dropped without a word.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

from core.tracking import schema, spool

logger = logging.getLogger(__name__)

# Differ between two executions of the same step: not compared, only de-duplicated.
NONDETERMINISTIC = (schema.TOKENS_PER_S, schema.MFU, "train/step_time_s", schema.COMPILE_S)
NONDETERMINISTIC_PREFIXES = (schema.ENERGY, schema.SYSTEM)
REL_TOL, ABS_TOL = 1e-5, 1e-8


def compared(key: str) -> bool:
  return key not in NONDETERMINISTIC and not key.startswith(NONDETERMINISTIC_PREFIXES)


def delivered_metrics(tracking_uri: str, run_id: str, spool_dir, from_step: int
                      ) -> dict[tuple[str, int], float]:
  """(metric, step) -> value of every point at step >= from_step in the store or the spool.

  The spool counts as delivered: what is in it reaches the store at the next replay.
  """
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  client = MlflowClient(tracking_uri)
  out: dict[tuple[str, int], float] = {}
  for key in client.get_run(run_id).data.metrics:
    if key.startswith(schema.SYSTEM):
      continue  # MLflow's monitor numbers its own samples
    for m in client.get_metric_history(run_id, key):
      if m.step >= from_step:
        out.setdefault((key, int(m.step)), m.value)
  if spool_dir is not None:
    for record in spool.read(spool_dir, run_id):
      if record.get("kind") == "batch":
        for key, value, _, step in record["metrics"]:
          if step >= from_step:
            out.setdefault((key, int(step)), value)
  return out


class DedupTracker:
  """A tracker that drops metrics already delivered and reports those that changed.

  Everything else is the wrapped tracker's (RunTracker or NullTracker).
  """

  def __init__(self, tracker, delivered: Mapping[tuple[str, int], float], say=print):
    self._tracker = tracker
    self._delivered = dict(delivered)
    self._say = say
    self.dropped = 0
    self.mismatches: list[tuple[str, int, float, float]] = []

  def __getattr__(self, name: str) -> Any:
    return getattr(self._tracker, name)

  def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
    fresh = {}
    for key, value in metrics.items():
      old = self._delivered.get((key, int(step)))
      if old is None:
        fresh[key] = value
        continue
      self.dropped += 1
      try:
        new = float(value)
      except (TypeError, ValueError):
        continue
      if compared(key) and not _same(old, new):
        self.mismatches.append((key, int(step), old, new))
        message = (f"resumed run differs from the interrupted one: {key} at step {step} was "
                   f"{old!r} when first logged, now {new!r} (the store keeps the first)")
        logger.warning(message)
        self._say(message)
    if fresh:
      self._tracker.log_metrics(fresh, step=step)


def _same(a: float, b: float) -> bool:
  if math.isnan(a) or math.isnan(b):
    return math.isnan(a) and math.isnan(b)
  return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)
