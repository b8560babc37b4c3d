"""Comparison plots: loss curves per variant with a band over seeds, and a bar chart.

Rendered with matplotlib's Agg backend (no display needed) and saved as PNG;
`ablax compare` logs them to the sweep's parent run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from analysis import axes as axes_lib
from analysis import stats
from analysis.table import Table


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def curves(
  c, groups: dict[str, list], key: str, axis: str = "step"
) -> dict[str, tuple[list[float], list[list[float]]]]:
  """variant -> (x, per-seed values) at the points every seed of the variant logged.

  On the step, tokens and FLOPs axes the seeds of a variant share their x values;
  on wall time each run has its own clock, so the first seed's times are used.
  """
  out = {}
  for variant, group_runs in groups.items():
    per_run = []
    for r in group_runs:
      xs, ys = axes_lib.curve(c, r, key, axis)
      if xs:
        per_run.append(dict(zip(xs, ys)) if axis != "time" else list(zip(xs, ys)))
    if not per_run:
      continue
    if axis == "time":
      n = min(len(h) for h in per_run)
      out[variant] = ([x for x, _ in per_run[0][:n]], [[y for _, y in h[:n]] for h in per_run])
      continue
    xs = sorted(set.intersection(*(set(h) for h in per_run)))
    out[variant] = (xs, [[h[x] for x in xs] for h in per_run])
  return out


def loss_curves(
  c, groups: dict[str, list], keys: Sequence[str], path: Path, title: str = "", axis: str = "step"
) -> Path | None:
  """One panel per metric key; per variant the mean over seeds and a ±1 std band.

  Tokens and FLOPs are drawn on a log x axis, where compute-matched gaps read
  as horizontal shifts.
  """
  keys = [k for k in keys if any(k in r.data.metrics for rs in groups.values() for r in rs)]
  if not keys:
    return None
  plt = _pyplot()
  fig, panels = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
  for ax, key in zip(panels[0], keys):
    for variant, (xs, values) in curves(c, groups, key, axis).items():
      if not xs:
        continue
      mean = [stats.mean(col) for col in zip(*values)]
      (line,) = ax.plot(xs, mean, label=f"{variant} (n={len(values)})")
      if len(values) > 1:
        sd = [stats.std(col) for col in zip(*values)]
        ax.fill_between(
          xs,
          [m - s for m, s in zip(mean, sd)],
          [m + s for m, s in zip(mean, sd)],
          color=line.get_color(),
          alpha=0.2,
          linewidth=0,
        )
    if axis in ("tokens", "flops"):
      ax.set_xscale("log")
    ax.set_xlabel(axes_lib.LABELS[axis])
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def forest(table: Table, path: Path) -> Path | None:
  """Each variant's Δ to the baseline with its CI, against a zero line."""
  rows = [r for r in table.rows if not r.baseline and r.delta is not None]
  if not rows:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 1.0 + 0.5 * len(rows)))
  for i, r in enumerate(rows):
    d = r.delta
    if not math.isnan(d.low):
      ax.plot([d.low, d.high], [i, i], color="tab:blue", linewidth=2)
    ax.plot([d.value], [i], "o", color="tab:blue")
    p = "" if math.isnan(d.p_holm) else f"  p={d.p_holm:.3g}"
    ax.annotate(
      f"{d.value:+.4f}{p}",
      (d.value, i),
      textcoords="offset points",
      xytext=(0, 6),
      ha="center",
      fontsize=7,
    )
  ax.axvline(0.0, color="gray", linestyle="--", linewidth=1)
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels([r.variant for r in rows], fontsize=8)
  ax.set_ylim(-0.7, len(rows) - 0.3)
  level = round(100 * table.confidence)
  ax.set_xlabel(f"Δ {table.metric} vs {table.baseline} ({table.match}), {level}% CI")
  ax.grid(axis="x", alpha=0.3)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def final_bars(table: Table, path: Path, title: str = "") -> Path:
  """Bar per variant: mean final metric, error bar ±1 std over seeds, baseline hatched."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(table.rows) + 2), 4))
  names = [r.variant for r in table.rows]
  means = [r.mean for r in table.rows]
  errs = [0.0 if math.isnan(r.std) else r.std for r in table.rows]
  bars = ax.bar(range(len(names)), means, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
  for bar, row in zip(bars, table.rows):
    if row.baseline:
      bar.set_hatch("//")
      bar.set_color("tab:gray")
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel(f"final {table.metric}")
  # A zero-based axis: bars whose axis starts near the smallest value exaggerate every
  # difference. The forest plot (forest.png) shows the differences at their scale.
  finite = [m + e for m, e in zip(means, errs) if not math.isnan(m)]
  if finite:
    ax.set_ylim(0.0, 1.1 * max(finite))
  for bar, mean in zip(bars, means):
    if not math.isnan(mean):
      ax.annotate(
        f"{mean:.4f}",
        (bar.get_x() + bar.get_width() / 2, mean),
        textcoords="offset points",
        xytext=(0, 3),
        ha="center",
        fontsize=7,
      )
  ax.grid(axis="y", alpha=0.3)
  ax.set_title(title or f"final {table.metric} (mean ± std over seeds)")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def scaling_fits(result, path: Path) -> Path:
  """Final loss vs training FLOPs (log-log): every run, each variant's fit and its bootstrap band.

  `result` is an analysis.ladder.ScalingResult; the curves run from below the smallest
  measured compute to past the target compute, so the extrapolation is visible as such.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  top = max(p.flops for v in result.variants for p in v.runs)
  for v in result.variants:
    xs = [b[0] for b in v.band]
    (line,) = ax.plot(
      xs,
      [v.fit.predict(x) for x in xs],
      label=f"{v.variant}{' (baseline)' if v.baseline else ''}: "
      f"E={v.fit.E:.3f}, α={v.fit.alpha:.3f}",
    )
    band = [(x, lo, hi) for x, lo, hi in v.band if not math.isnan(lo)]
    if band:
      ax.fill_between(
        [b[0] for b in band],
        [b[1] for b in band],
        [b[2] for b in band],
        color=line.get_color(),
        alpha=0.15,
        linewidth=0,
      )
    ax.scatter(
      [p.flops for p in v.runs], [p.loss for p in v.runs], s=14, color=line.get_color(), zorder=3
    )
  ax.axvline(top, color="gray", linestyle=":", linewidth=1)
  ax.axvline(result.at_flops, color="gray", linestyle="--", linewidth=1)
  ax.annotate(
    f"target {result.at_flops:.3g}",
    (result.at_flops, ax.get_ylim()[1]),
    fontsize=7,
    ha="right",
    va="top",
    rotation=90,
  )
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("training FLOPs (model)")
  ax.set_ylabel(f"final {result.metric}")
  ax.set_title(
    f"L(C) = E + A·C^-α, {round(100 * result.confidence)}% bootstrap bands "
    f"(dotted: largest measured compute)",
    fontsize=9,
  )
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
