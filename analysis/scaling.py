"""Scaling-law fits of a size ladder: L(C) = E + A * C^(-alpha) per variant, with bootstrap CIs.

C is training FLOPs and L the final loss of one run. The fit profiles alpha:
for a fixed alpha the model is linear in (E, A), so non-negative least squares
gives the best E >= 0 and A >= 0 in closed form, and nested grids over
alpha find the least-squares optimum. No starting point to choose and no
local minimum in (E, A); the parameters stay physical (a loss that falls with
compute towards a non-negative floor).

Uncertainty comes from the seeds: a bootstrap replicate redraws, at every
size, that size's seeds with replacement (the same draw for every variant, so
variants that share seeds stay paired) and refits every variant. Intervals
are percentiles of the replicates. With a handful of seeds per size the plain
redraw understates the spread by a factor sqrt((n - 1) / n) (the bootstrap
variance of a mean of n values is (n - 1) / n^2 of the sample variance), so
each replicate's seed deviations from their size's mean are inflated by
sqrt(n / (n - 1)) before refitting: the usual small-sample correction of the
smoothed bootstrap, without which two seeds per size give intervals about
30% too narrow.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

NAN = float("nan")
ALPHA_BOUNDS = (1e-3, 3.0)  # exponents outside this range are not scaling laws we could measure
_GRID = 160
_STAGES = 5


class ScalingError(ValueError):
  """A ladder that cannot be fitted (too few sizes, too little compute span)."""


@dataclasses.dataclass(frozen=True)
class Fit:
  """L(C) = E + A * C^(-alpha), least squares over the runs."""

  E: float
  A: float
  alpha: float
  rss: float
  n: int

  def predict(self, flops) -> np.ndarray | float:
    c = np.asarray(flops, dtype=float)
    out = self.E + self.A * np.power(c, -self.alpha)
    return float(out) if out.ndim == 0 else out

  def flops_for(self, loss: float) -> float:
    """The compute at which this curve reaches `loss` (inf at or below its floor E)."""
    if self.A <= 0 or loss <= self.E:
      return math.inf
    return float(((loss - self.E) / self.A) ** (-1.0 / self.alpha))


def _profile(
  x: np.ndarray, y: np.ndarray, alphas: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(E, A', rss) per alpha: least squares of y on [1, x^-alpha] with E, A' >= 0.

  Two-variable non-negative least squares in closed form: the unconstrained
  solution when both coefficients are >= 0, else the better of the two
  one-coefficient fits (A' = 0, or E = 0), which is where the constrained optimum lies.
  """
  z = np.power(x[None, :], -alphas[:, None])  # (alphas, points)
  zm, ym = z.mean(axis=1), y.mean()
  szz = ((z - zm[:, None]) ** 2).sum(axis=1)
  szy = ((z - zm[:, None]) * (y - ym)[None, :]).sum(axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    a_free = np.where(szz > 0, szy / szz, 0.0)
  e_free = ym - a_free * zm
  rss_free = ((y[None, :] - e_free[:, None] - a_free[:, None] * z) ** 2).sum(axis=1)
  # E = 0: A' = <z, y> / <z, z>, clipped at 0.
  a_only = np.maximum((z * y[None, :]).sum(axis=1) / (z * z).sum(axis=1), 0.0)
  rss_a = ((y[None, :] - a_only[:, None] * z) ** 2).sum(axis=1)
  # A' = 0: E = max(mean y, 0).
  e_only = max(ym, 0.0)
  rss_e = np.full_like(rss_free, float(((y - e_only) ** 2).sum()))
  free_ok = (a_free >= 0) & (e_free >= 0)
  rss_free = np.where(free_ok, rss_free, np.inf)
  choice = np.argmin(np.stack([rss_free, rss_a, rss_e]), axis=0)
  e = np.choose(choice, [e_free, np.zeros_like(e_free), np.full_like(e_free, e_only)])
  a = np.choose(choice, [a_free, a_only, np.zeros_like(a_free)])
  rss = np.choose(choice, [rss_free, rss_a, rss_e])
  return e, a, rss


def fit(flops: Sequence[float], loss: Sequence[float]) -> Fit:
  """The least-squares fit of L = E + A * C^(-alpha) to the points (seeds are replicates)."""
  c = np.asarray(flops, dtype=float)
  y = np.asarray(loss, dtype=float)
  if c.shape != y.shape or c.ndim != 1:
    raise ScalingError("flops and loss must be 1-d and of equal length")
  if not (np.all(np.isfinite(c)) and np.all(c > 0) and np.all(np.isfinite(y))):
    raise ScalingError("flops must be positive and finite, losses finite")
  if len(np.unique(c)) < 3:
    raise ScalingError(
      f"a 3-parameter fit needs at least 3 distinct compute values, got {len(np.unique(c))}"
    )
  # C around 1e12..1e21: work with C / C0 so that x^(-alpha) stays near 1.
  c0 = float(np.exp(np.mean(np.log(c))))
  x = c / c0
  lo, hi = ALPHA_BOUNDS
  log_lo, log_hi = math.log(lo), math.log(hi)
  # The profile over alpha is smooth: a grid, then finer grids around the best cell, each
  # stage narrowing the bracket ~80x (log alpha to ~1e-9 after five), all vectorized.
  for _ in range(_STAGES):
    grid = np.linspace(log_lo, log_hi, _GRID)
    rss = _profile(x, y, np.exp(grid))[2]
    i = int(np.argmin(rss))
    log_lo, log_hi = grid[max(i - 1, 0)], grid[min(i + 1, _GRID - 1)]
  alpha = math.exp(grid[i])
  e, a_scaled, r = (float(v[0]) for v in _profile(x, y, np.array([alpha])))
  return Fit(E=e, A=a_scaled * c0**alpha, alpha=alpha, rss=r, n=len(y))


# ------------------------------------------------------------------ runs and bootstrap


@dataclasses.dataclass(frozen=True)
class Run:
  """One ladder point's result: size label, seed, training FLOPs, final loss."""

  size: str
  seed: str
  flops: float
  loss: float


def check_ladder(
  runs: Sequence[Run], min_sizes: int = 3, min_span: float = 4.0, what: str = "ladder"
) -> None:
  """ScalingError unless the runs cover >= min_sizes sizes spanning >= min_span x in compute."""
  sizes = {r.size for r in runs}
  if len(sizes) < min_sizes:
    raise ScalingError(
      f"{what} has {len(sizes)} size(s) with finished runs "
      f"({', '.join(sorted(sizes)) or 'none'}); a scaling fit needs at least "
      f"{min_sizes}"
    )
  per_size = [np.mean([r.flops for r in runs if r.size == s]) for s in sizes]
  span = max(per_size) / min(per_size)
  if span < min_span:
    raise ScalingError(
      f"{what}'s sizes span {span:.2f}x in training FLOPs; a scaling fit needs "
      f"at least {min_span:g}x (add a smaller or larger size)"
    )


def _resample(
  runs: Sequence[Run], draw: Mapping[str, list[str]], rng: np.random.Generator
) -> list[Run]:
  """The runs of one bootstrap replicate: per size, the drawn seeds, deviations inflated."""
  out = []
  for size, seeds in draw.items():
    mine = {r.seed: r for r in runs if r.size == size}
    if not mine:
      continue
    own = list(mine)
    picked = [mine[s] if s in mine else mine[own[rng.integers(len(own))]] for s in seeds]
    n = len(own)
    mean = float(np.mean([r.loss for r in mine.values()]))
    scale = math.sqrt(n / (n - 1)) if n > 1 else 1.0
    out += [dataclasses.replace(r, loss=mean + scale * (r.loss - mean)) for r in picked]
  return out


def bootstrap(
  variants: Mapping[str, Sequence[Run]], n_boot: int = 1000, seed: int = 0
) -> dict[str, list[Fit | None]]:
  """variant -> n_boot refits, each on the same per-size seed draw for every variant.

  A replicate whose refit fails (too few distinct sizes) is None.
  """
  rng = np.random.default_rng(seed)
  sizes = sorted({r.size for runs in variants.values() for r in runs})
  seeds_at = {
    s: sorted({r.seed for runs in variants.values() for r in runs if r.size == s}) for s in sizes
  }
  out: dict[str, list[Fit | None]] = {v: [] for v in variants}
  for _ in range(n_boot):
    draw = {s: [ss[i] for i in rng.integers(len(ss), size=len(ss))] for s, ss in seeds_at.items()}
    for v, runs in variants.items():
      sample = _resample(runs, draw, rng)
      try:
        out[v].append(fit([r.flops for r in sample], [r.loss for r in sample]))
      except ScalingError:
        out[v].append(None)
  return out


def percentile_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
  """Two-sided percentile interval of the finite-or-infinite values (NaNs dropped)."""
  v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
  if v.size == 0:
    return NAN, NAN
  q = (1.0 - confidence) / 2.0
  lo, hi = np.quantile(v, [q, 1.0 - q])
  return float(lo), float(hi)


def multiplier(base: Fit, variant: Fit, flops: float) -> float:
  """k with L_base(k * C) = L_variant(C): the compute the baseline needs to match the variant.

  k > 1: the variant is worth k x compute; inf when the variant's loss at C is at or below
  the baseline's floor E (no amount of baseline compute reaches it).
  """
  target = variant.predict(flops)
  return base.flops_for(target) / flops


def bootstrap_p(deltas: Sequence[float]) -> float:
  """Two-sided bootstrap p of "delta = 0": twice the smaller tail share, at most 1."""
  d = np.asarray([x for x in deltas if not math.isnan(x)], dtype=float)
  if d.size == 0:
    return NAN
  tail = min(np.mean(d <= 0.0), np.mean(d >= 0.0))
  return float(min(1.0, 2.0 * max(tail, 1.0 / d.size)))
