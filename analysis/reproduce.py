"""Checking a re-run against its original: metric curves, code version, environment, data.

Only metrics that are functions of the configuration are compared (losses,
norms); throughput, MFU, timings and energy depend on the machine's load and
are left out.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

from analysis import runs as runs_lib

# Metrics that measure the machine rather than the model.
UNSTABLE_METRICS = re.compile(
  r"tokens_per_s|step_time|mfu|eta_s|compile_s|elapsed|energy|co2|"
  r"carbon|_time|time_s|seconds|memory",
  re.IGNORECASE,
)
# Tags that differ between any two runs by design.
PER_RUN_TAGS = re.compile(
  r"^(mlflow\.|ablax\.sweep\.|ablax\.reproduce|ablax\.env\.|ablax\.error|"
  r"config_hash$|ablax\.config_hash$|mfu_peak_source$|hostname$|mesh$)"
)
CODE_TAGS = re.compile(r"(^|\.)(git|commit|dirty|diff|untracked|branch)|^ablax\.version$")


@dataclasses.dataclass
class MetricMatch:
  key: str
  steps: int  # steps compared
  identical: bool
  max_rel_diff: float
  worst_step: int | None
  missing_steps: list[int]  # in the original, absent from the re-run (or the reverse)


@dataclasses.dataclass
class Report:
  metrics: list[MetricMatch]
  rtol: float

  @property
  def identical(self) -> bool:
    return bool(self.metrics) and all(m.identical and not m.missing_steps for m in self.metrics)

  @property
  def max_rel_diff(self) -> float:
    return max((m.max_rel_diff for m in self.metrics), default=math.nan)

  @property
  def matches(self) -> bool:
    return bool(self.metrics) and all(
      not m.missing_steps and m.max_rel_diff <= self.rtol for m in self.metrics
    )

  def summary(self) -> str:
    if not self.metrics:
      return "no comparable metrics (the original logged no loss curves)"
    if self.identical:
      n = sum(m.steps for m in self.metrics)
      return f"IDENTICAL: {len(self.metrics)} metric curves, {n} values, equal bit for bit"
    worst = max(self.metrics, key=lambda m: (bool(m.missing_steps), m.max_rel_diff))
    verdict = "MATCH within rtol" if self.matches else "DIFFERENT"
    where = (
      f"{worst.key} misses steps {worst.missing_steps[:5]}"
      if worst.missing_steps
      else f"max relative difference {worst.max_rel_diff:.3e} in {worst.key} at step "
      f"{worst.worst_step}"
    )
    return f"{verdict} (rtol {self.rtol:g}): {where}"


def rel_diff(a: float, b: float) -> float:
  if a == b or (math.isnan(a) and math.isnan(b)):
    return 0.0
  scale = max(abs(a), abs(b))
  return math.inf if scale == 0 or math.isinf(scale) else abs(a - b) / scale


def comparable_metrics(run) -> list[str]:
  return sorted(k for k in run.data.metrics if not UNSTABLE_METRICS.search(k))


def compare_histories(c, original_id: str, rerun_id: str, rtol: float = 0.0) -> Report:
  """Every comparable metric of the original against the re-run, step by step."""
  original = runs_lib.get_run(c, original_id)
  results = []
  for key in comparable_metrics(original):
    a = {p.step: p.value for p in runs_lib.history(c, original_id, key)}
    b = {p.step: p.value for p in runs_lib.history(c, rerun_id, key)}
    common = sorted(set(a) & set(b))
    missing = sorted(set(a) ^ set(b))
    diffs = [(rel_diff(a[s], b[s]), s) for s in common]
    worst = max(diffs, default=(0.0, None))
    results.append(
      MetricMatch(key, len(common), all(a[s] == b[s] for s in common), worst[0], worst[1], missing)
    )
  return Report(results, rtol)


def tag_differences(original: Mapping[str, str], current: Mapping[str, str]) -> dict[str, list]:
  """{'code': [(key, original, now)], 'environment': [...]} over tags both sides have."""
  out: dict[str, list] = {"code": [], "environment": []}
  for key in sorted(set(original) & set(current)):
    if PER_RUN_TAGS.search(key):
      continue
    if str(original[key]) != str(current[key]):
      kind = "code" if CODE_TAGS.search(key) else "environment"
      out[kind].append((key, _short(original[key]), _short(current[key])))
  return out


def dict_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
  """Paths where two JSON-like values differ (for data manifests)."""
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    out = []
    for key in sorted(set(a) | set(b), key=str):
      path = f"{prefix}.{key}" if prefix else str(key)
      if key not in a or key not in b:
        out.append(f"{path} only in {'the re-run' if key not in a else 'the original'}")
      else:
        out += dict_differences(a[key], b[key], path)
    return out
  return [] if a == b else [f"{prefix or '(value)'}: {_short(a)} -> {_short(b)}"]


def _short(value: Any, limit: int = 80) -> str:
  text = str(value)
  return text if len(text) <= limit else text[: limit - 3] + "..."
