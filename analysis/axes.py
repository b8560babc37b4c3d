"""The x axis of a comparison: step, tokens, training FLOPs or wall time, per run.

Variants differ in FLOPs per token (MQA, local attention, the MLP variant), so
equal steps favour the costlier one. A run's tokens at step s are
s x train.global_batch x train.seq_len and its FLOPs are tokens x
flops_per_token, all from the run's own params (the trainer logs them), so
the axis is exact at every logged step, eval steps included. `value_at`
matches runs at equal tokens or FLOPs by linear interpolation of the metric's
curve; it never extrapolates.
"""

from __future__ import annotations

import bisect
from typing import Sequence

from analysis import runs as runs_lib
from core.tracking import schema

AXES = ("step", "tokens", "flops", "time")
LABELS = {
  "step": "step",
  "tokens": "tokens",
  "flops": "training FLOPs (model)",
  "time": "wall time (s)",
}


class AxisError(ValueError):
  """A run that lacks what an axis needs, or a match point outside a run's curve."""


def parse_at(text: str | None) -> tuple[str, float] | None:
  """'tokens=1e6' -> ('tokens', 1e6); None stays None."""
  if not text:
    return None
  axis, _, value = text.partition("=")
  if axis not in ("step", "tokens", "flops") or not value:
    raise AxisError(f"--at takes step=S, tokens=N or flops=F, got {text!r}")
  try:
    return axis, float(value)
  except ValueError:
    raise AxisError(f"--at {axis}= needs a number, got {value!r}") from None


def _per_step(run, axis: str) -> float:
  params = run.data.params
  try:
    tokens = float(params[schema.GLOBAL_BATCH]) * float(params[schema.SEQ_LEN])
    return tokens if axis == "tokens" else tokens * float(params[schema.FLOPS_PER_TOKEN])
  except KeyError as e:
    raise AxisError(
      f"run {run.info.run_id} has no param {e.args[0]}: it predates the "
      f"{axis} axis; compare it by step"
    ) from None


def curve(c, run, key: str, axis: str) -> tuple[list[float], list[float]]:
  """(x, y) of metric `key` of `run` along `axis`."""
  points = runs_lib.history(c, run.info.run_id, key)
  if axis == "step":
    return [float(p.step) for p in points], [p.value for p in points]
  if axis == "time":
    start = run.info.start_time
    return [(p.timestamp - start) / 1000.0 for p in points], [p.value for p in points]
  scale = _per_step(run, axis)
  return [p.step * scale for p in points], [p.value for p in points]


def value_at(c, run, key: str, axis: str, x: float) -> float:
  """The metric at `x` on `axis`, linearly interpolated between its two neighbouring points."""
  return interpolate(*curve(c, run, key, axis), x, run.info.run_id, key, axis)


def interpolate(
  xs: Sequence[float], ys: Sequence[float], x: float, run_id: str, key: str, axis: str
) -> float:
  """ys at x on a run's sorted curve (axis.curve), linearly between its neighbouring points."""
  if not xs:
    raise AxisError(f"run {run_id} logged no {key}")
  if not xs[0] <= x <= xs[-1]:
    raise AxisError(
      f"run {run_id} has {key} from {axis}={xs[0]:.4g} to "
      f"{xs[-1]:.4g}; {axis}={x:.4g} is outside it (no extrapolation)"
    )
  i = bisect.bisect_left(xs, x)
  if xs[i] == x:
    return ys[i]
  x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
  return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
