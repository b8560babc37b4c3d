"""Small-sample statistics for seeds: mean, std, Student-t intervals and p-values, Holm.

Sweeps have a handful of seeds per variant, so intervals and tests use Student's
t distribution (scipy.stats), paired over seeds when both variants ran the same
seeds. Several variants compared with one baseline are several tests: their
p-values are adjusted with Holm's step-down method, which controls the
family-wise error rate without assuming independence.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

NAN = float("nan")


def mean(xs: Sequence[float]) -> float:
  return sum(xs) / len(xs) if xs else NAN


def std(xs: Sequence[float]) -> float:
  """Sample standard deviation (n - 1 in the denominator); NaN below two values."""
  if len(xs) < 2:
    return NAN
  m = mean(xs)
  return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@dataclasses.dataclass(frozen=True)
class Delta:
  """A difference of means with its confidence interval (NaN bounds when undefined)."""

  value: float
  low: float
  high: float
  method: str  # 'paired', 'welch' or 'none'
  p: float = NAN  # two-sided p of "no difference" (t test of `method`)
  p_holm: float = NAN  # p adjusted over the variants of one comparison (holm())


def delta_ci(
  values: Sequence[float], baseline: Sequence[float], confidence: float = 0.95, paired: bool = False
) -> Delta:
  """mean(values) - mean(baseline) with a two-sided Student-t interval.

  Args:
    values, baseline: one final metric per seed.
    confidence: e.g. 0.95.
    paired: the i-th entries share a seed (same data order and init stream),
      so the per-seed differences are used (a paired t interval), which removes
      the seed-to-seed variance both variants share. Otherwise Welch's
      interval (unequal variances, Welch-Satterthwaite degrees of freedom).
  """
  from scipy import stats as sps  # pylint: disable=g-import-not-at-top

  value = mean(values) - mean(baseline)
  if paired and len(values) == len(baseline) and len(values) >= 2:
    diffs = [v - b for v, b in zip(values, baseline)]
    if std(diffs) == 0.0:
      return Delta(value, value, value, "paired", 0.0 if value else 1.0)
    test = sps.ttest_rel(values, baseline)
    method = "paired"
  elif len(values) >= 2 and len(baseline) >= 2:
    if std(values) == 0.0 and std(baseline) == 0.0:
      return Delta(value, value, value, "welch", 0.0 if value else 1.0)
    test = sps.ttest_ind(values, baseline, equal_var=False)
    method = "welch"
  else:
    return Delta(value, NAN, NAN, "none")
  ci = test.confidence_interval(confidence_level=confidence)
  return Delta(value, float(ci.low), float(ci.high), method, float(test.pvalue))


def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm-adjusted p-values, in the order given (NaN stays NaN and is not counted)."""
  order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
  out = [NAN] * len(pvalues)
  running, m = 0.0, len(order)
  for rank, (p, i) in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p))
    out[i] = running
  return out
