"""Small-sample statistics for seeds: mean, standard deviation, Student-t intervals.

Sweeps have a handful of seeds per variant, so intervals use Student's t
distribution, not the normal one. The t quantile is computed here (regularized
incomplete beta by continued fraction, then bisection) so that the analysis
needs nothing beyond the standard library.
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


def _betacf(a: float, b: float, x: float) -> float:
  """Continued fraction of the incomplete beta function (modified Lentz)."""
  tiny, eps = 1e-300, 1e-15
  qab, qap, qam = a + b, a + 1.0, a - 1.0
  c, d = 1.0, 1.0 - qab * x / qap
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 10_000):
    m2 = 2 * m
    aa = m * (b - m) * x / ((qam + m2) * (a + m2))
    d = 1.0 + aa * d
    d = 1.0 / (d if abs(d) > tiny else tiny)
    c = 1.0 + aa / c
    c = c if abs(c) > tiny else tiny
    h *= d * c
    aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
    d = 1.0 + aa * d
    d = 1.0 / (d if abs(d) > tiny else tiny)
    c = 1.0 + aa / c
    c = c if abs(c) > tiny else tiny
    delta = d * c
    h *= delta
    if abs(delta - 1.0) < eps:
      break
  return h


def betainc(a: float, b: float, x: float) -> float:
  """Regularized incomplete beta I_x(a, b)."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
               + a * math.log(x) + b * math.log1p(-x))
  if x < (a + 1.0) / (a + b + 2.0):
    return math.exp(log_front) * _betacf(a, b, x) / a
  return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
  tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
  return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
  """The p-quantile of Student's t with df degrees of freedom (p in (0, 1))."""
  if not 0.0 < p < 1.0 or df <= 0:
    raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
  if p < 0.5:
    return -t_quantile(1.0 - p, df)
  lo, hi = 0.0, 1.0
  while t_cdf(hi, df) < p:
    hi *= 2.0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if t_cdf(mid, df) < p:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class Delta:
  """A difference of means with its confidence interval (NaN bounds when undefined)."""

  value: float
  low: float
  high: float
  method: str  # 'paired', 'welch' or 'none'


def delta_ci(values: Sequence[float], baseline: Sequence[float], confidence: float = 0.95,
             paired: bool = False) -> Delta:
  """mean(values) - mean(baseline) with a two-sided Student-t interval.

  Args:
    values, baseline: one final metric per seed.
    confidence: e.g. 0.95.
    paired: the i-th entries share a seed (same data order and init stream),
      so the per-seed differences are used (a paired t interval), which removes
      the seed-to-seed variance both variants share. Otherwise Welch's
      interval (unequal variances, Welch-Satterthwaite degrees of freedom).
  """
  value = mean(values) - mean(baseline)
  q = 0.5 + confidence / 2.0
  if paired and len(values) == len(baseline) and len(values) >= 2:
    diffs = [v - b for v, b in zip(values, baseline)]
    sd = std(diffs)
    half = t_quantile(q, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return Delta(value, value - half, value + half, "paired")
  if len(values) >= 2 and len(baseline) >= 2:
    va, vb = std(values) ** 2 / len(values), std(baseline) ** 2 / len(baseline)
    se = math.sqrt(va + vb)
    if se == 0.0:
      return Delta(value, value, value, "welch")
    df = (va + vb) ** 2 / (va ** 2 / (len(values) - 1) + vb ** 2 / (len(baseline) - 1))
    half = t_quantile(q, df) * se
    return Delta(value, value - half, value + half, "welch")
  return Delta(value, NAN, NAN, "none")
