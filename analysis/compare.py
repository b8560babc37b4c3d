"""Comparing a sweep's variants (or any set of runs) from MLflow: table, plots, artifacts."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Sequence

from analysis import axes as axes_lib
from analysis import plots
from analysis import runs as runs_lib
from analysis import table as table_lib

CURVE_KEYS = ("train/loss", "eval/loss")


@dataclasses.dataclass
class Comparison:
  table: table_lib.Table
  groups: dict[str, list]
  parent: object | None  # the sweep's parent run, when comparing a sweep


def compare(
  c,
  sweep: str | None = None,
  experiment: str | None = None,
  filter_string: str = "",
  group_by: Sequence[str] = (),
  metric: str | None = None,
  baseline: str | None = None,
  confidence: float = 0.95,
  at: tuple[str, float] | None = None,
) -> Comparison:
  """Groups finished runs into variants and computes the table.

  Args:
    c: an MlflowClient.
    sweep: a sweep name or parent run id (its children are compared).
    experiment, filter_string: otherwise, the finished runs of this experiment
      matching an MLflow filter (e.g. "params.`ModelConfig.num_kv_heads` = '1'").
    group_by: params (or tags) whose values define a variant; default: the
      sweep variant tag, else the run name.
    metric: the ranking metric; default: the sweep's, else eval/loss (or train/loss).
    baseline: the reference variant; default: the sweep's baseline, else the first variant.
    at: compare at equal ('tokens', N) or ('flops', F) (analysis.axes), not at the end.
  """
  parent, user_baseline = None, baseline
  if sweep:
    parent = runs_lib.find_sweep(c, sweep)
    children = runs_lib.sweep_children(c, parent)
    source = (
      f"sweep {parent.data.tags.get(runs_lib.SWEEP_TAG, parent.info.run_name)} "
      f"(parent run {parent.info.run_id})"
    )
    started = runs_lib.sweep_children(c, parent, finished_only=False)
    if len(started) > len(children):
      source += f"; {len(started) - len(children)} unfinished point(s) left out"
    if not children:
      raise runs_lib.RunLookupError(
        f"{source} has no finished child runs yet ({len(started)} unfinished); "
        f"run or resume it with `ablax sweep`"
      )
    metric = metric or parent.data.tags.get(runs_lib.METRIC_TAG)
    if baseline is None:
      baseline = parent.data.tags.get(runs_lib.BASELINE_TAG)
  elif experiment:
    children = runs_lib.experiment_runs(c, experiment, filter_string)
    source = f"experiment {experiment}" + (f" filtered by {filter_string}" if filter_string else "")
    if not children:
      raise runs_lib.RunLookupError(f"no finished runs in {source}")
  else:
    raise ValueError("give a sweep (name or parent run id) or an experiment")
  groups = runs_lib.group(children, group_by)
  if metric is None:
    metric = next(
      (k for k in table_lib.FALLBACK_LOSS_KEYS if all(k in r.data.metrics for r in children)), None
    )
    if metric is None:
      raise runs_lib.RunLookupError(
        f"no loss metric common to all runs of {source}; choose one with --metric"
      )
  if baseline is not None and baseline not in groups:
    if user_baseline is not None:
      raise runs_lib.RunLookupError(
        f"baseline {baseline!r} is not a variant of {source}; variants: {list(groups)}"
      )
    source += f"; its baseline {baseline} has no finished runs, so deltas are to the first variant"
    baseline = None
  if baseline is None:
    baseline = next(iter(groups))
  table = table_lib.build(c, groups, metric, baseline, confidence, source, at)
  return Comparison(table, groups, parent)


def save_plots(
  c,
  comparison: Comparison,
  out_dir: Path | None = None,
  log_to_parent: bool = True,
  axis: str = "step",
) -> list[Path]:
  """Writes the plots and the table in every format; logs them to the parent run.

  loss_curves.png (against `axis`), loss_vs_tokens.png and loss_vs_flops.png
  (log x) where the runs record their tokens and FLOPs, forest.png (each Δ with
  its CI) and final_<metric>.png (zero-based bars).
  """
  out_dir = Path(out_dir or tempfile.mkdtemp(prefix="ablax-compare-"))
  table = comparison.table
  title = table.source
  paths = []
  curve_keys = list(dict.fromkeys([*CURVE_KEYS, table.metric]))
  curve = plots.loss_curves(
    c, comparison.groups, curve_keys, out_dir / "loss_curves.png", title, axis=axis
  )
  if curve:
    paths.append(curve)
  for extra in ("tokens", "flops"):
    if extra == axis:
      continue
    try:
      path = plots.loss_curves(
        c, comparison.groups, curve_keys, out_dir / f"loss_vs_{extra}.png", title, axis=extra
      )
    except axes_lib.AxisError:
      continue  # runs from before the trainer logged tokens and FLOPs per token
    if path:
      paths.append(path)
  forest = plots.forest(table, out_dir / "forest.png")
  if forest:
    paths.append(forest)
  safe = table.metric.replace("/", "_")
  paths.append(plots.final_bars(table, out_dir / f"final_{safe}.png"))
  for fmt, ext in (("markdown", "md"), ("csv", "csv"), ("latex", "tex")):
    path = out_dir / f"comparison.{ext}"
    path.write_text(table_lib.render(table, fmt))
    paths.append(path)
  if log_to_parent and comparison.parent is not None:
    for path in paths:
      c.log_artifact(comparison.parent.info.run_id, str(path), "comparison")
    log_result(c, comparison)
  return paths


def log_result(c, comparison: Comparison) -> None:
  """The result on the sweep's parent run: per-variant metrics, the table, the sweep's energy.

  Metrics are `compare/<variant>/{mean,std,delta,ci_low,ci_high,p,p_holm}`, plus
  `matched_mean`, `matched_delta` and `matched_p_holm` at the table's FLOPs
  match (the variant with characters MLflow refuses replaced), so the parent alone answers
  "which variant won, by how much, how sure"; `comparison/table.json` is the
  table as an MLflow table artifact.
  """
  import math  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from mlflow.entities import Metric  # pylint: disable=g-import-not-at-top
  from core.tracking.store import clean_key  # pylint: disable=g-import-not-at-top

  table = comparison.table
  now = int(time.time() * 1000)

  def stats_of(row) -> dict[str, float | None]:
    d, m = row.delta, row.matched_delta
    return {
      "mean": row.mean,
      "std": row.std,
      "delta": d and d.value,
      "ci_low": d and d.low,
      "ci_high": d and d.high,
      "p": d and d.p,
      "p_holm": d and d.p_holm,
      "matched_mean": row.matched_mean,
      "matched_delta": m and m.value,
      "matched_p_holm": m and m.p_holm,
    }

  metrics = []
  for row in table.rows:
    # The baseline's delta to itself says nothing; its mean and std go in.
    names = ("mean", "std", "matched_mean") if row.baseline else tuple(stats_of(row))
    for name, value in stats_of(row).items():
      if name in names and value is not None and not math.isnan(value):
        metrics.append(Metric(clean_key(f"compare/{row.variant}/{name}"), float(value), now, 0))
  energy = [r.energy_kwh * r.n for r in table.rows if not math.isnan(r.energy_kwh)]
  carbon = [r.carbon_kg * r.n for r in table.rows if not math.isnan(r.carbon_kg)]
  if energy:
    metrics.append(Metric("sweep/energy_kwh", float(sum(energy)), now, 0))
  if carbon:
    metrics.append(Metric("sweep/co2_kg", float(sum(carbon)), now, 0))
  run_id = comparison.parent.info.run_id
  for i in range(0, len(metrics), 1000):
    c.log_batch(run_id, metrics=metrics[i : i + 1000])
  rows = [
    {
      "variant": r.variant,
      "n": r.n,
      **stats_of(r),
      "tokens_per_s": r.tokens_per_s,
      "mfu": r.mfu,
      "energy_kwh": r.energy_kwh,
      "carbon_kg": r.carbon_kg,
    }
    for r in table.rows
  ]
  c.log_table(
    run_id,
    data={k: [row[k] for row in rows] for k in rows[0]},
    artifact_file="comparison/table.json",
  )
