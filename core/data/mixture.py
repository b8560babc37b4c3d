"""Mixture weights and their schedule over training steps.

Weights are shares of tokens. Gemma trains on a staged mixture, raising the
weight of high-quality data late in training; here a schedule is a tuple of
(start_step, {source: weight}) stages and the batch at step s uses the stage
that contains s.

The next document comes from the source that is furthest behind its share of
the tokens delivered in the current stage (largest deficit), ties to the first
source. This is deterministic, needs no random numbers, and keeps each source's
share within one document of its weight at any point; the randomness of a run
is in each source's shuffled order.
"""

from __future__ import annotations

import bisect
from typing import Any, Mapping, Sequence

from core.data.errors import DataError


class Schedule:
  """Normalized mixture weights by stage."""

  def __init__(
    self,
    names: Sequence[str],
    weights: Mapping[str, float] | None = None,
    stages: Sequence[tuple[int, Mapping[str, float]]] | None = None,
  ):
    self.names = tuple(names)
    if stages is None:
      stages = [(0, weights if weights is not None else {n: 1.0 for n in self.names})]
    elif weights is not None:
      raise DataError(
        "give mixture weights or stages, not both (a single stage is stages=((0, weights),))"
      )
    stages = sorted(((int(step), dict(w)) for step, w in stages), key=lambda s: s[0])
    if not stages or stages[0][0] != 0:
      raise DataError(f"the first mixture stage must start at step 0, got {[s for s, _ in stages]}")
    steps = [s for s, _ in stages]
    if len(set(steps)) != len(steps):
      raise DataError(f"two mixture stages start at the same step: {steps}")
    self.starts = steps
    self.weights = [self._normalize(w, step) for step, w in stages]

  def _normalize(self, weights: Mapping[str, Any], step: int) -> dict[str, float]:
    unknown = sorted(set(weights) - set(self.names))
    if unknown:
      raise DataError(
        f"mixture weights (stage at step {step}) name {unknown}, which are not "
        f"sources; the sources are {list(self.names)}"
      )
    values = {n: float(weights.get(n, 0.0)) for n in self.names}
    if any(v < 0 for v in values.values()):
      raise DataError(f"mixture weights must be >= 0, got {values} (stage at step {step})")
    total = sum(values.values())
    if total <= 0:
      raise DataError(f"mixture weights (stage at step {step}) are all zero: {values}")
    return {n: v / total for n, v in values.items()}

  def stage_at(self, step: int) -> int:
    return bisect.bisect_right(self.starts, step) - 1

  def weights_at(self, step: int) -> dict[str, float]:
    return self.weights[self.stage_at(step)]

  def describe(self) -> list[dict]:
    return [{"start_step": s, "weights": w} for s, w in zip(self.starts, self.weights)]


def pick_source(
  weights: Mapping[str, float], delivered: Mapping[str, int], available: Sequence[str]
) -> str | None:
  """The available source furthest behind its weighted share of the delivered tokens."""
  total = sum(delivered.get(n, 0) for n in available)
  best, best_deficit = None, None
  for name in available:
    w = weights.get(name, 0.0)
    if w <= 0:
      continue
    deficit = w * total - delivered.get(name, 0)
    if best_deficit is None or deficit > best_deficit:
      best, best_deficit = name, deficit
  return best
