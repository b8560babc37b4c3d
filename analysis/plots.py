"""Comparison plots: loss curves per variant with a band over seeds, and a bar chart.

Rendered with matplotlib's Agg backend (no display needed) and saved as PNG;
`ablax compare` logs them to the sweep's parent run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from analysis import runs as runs_lib
from analysis import stats
from analysis.table import Table


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def curves(c, groups: dict[str, list], key: str) -> dict[str, tuple[list[int], list[list[float]]]]:
  """variant -> (steps, per-seed values): the steps every seed of the variant logged."""
  out = {}
  for variant, group_runs in groups.items():
    per_run = [{p.step: p.value for p in runs_lib.history(c, r.info.run_id, key)}
               for r in group_runs]
    per_run = [h for h in per_run if h]
    if not per_run:
      continue
    steps = sorted(set.intersection(*(set(h) for h in per_run)))
    out[variant] = (steps, [[h[s] for s in steps] for h in per_run])
  return out


def loss_curves(c, groups: dict[str, list], keys: Sequence[str], path: Path,
                title: str = "") -> Path | None:
  """One panel per metric key; per variant the mean over seeds and a ±1 std band."""
  keys = [k for k in keys if any(k in r.data.metrics for rs in groups.values() for r in rs)]
  if not keys:
    return None
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for variant, (steps, values) in curves(c, groups, key).items():
      if not steps:
        continue
      mean = [stats.mean(col) for col in zip(*values)]
      line, = ax.plot(steps, mean, label=f"{variant} (n={len(values)})")
      if len(values) > 1:
        sd = [stats.std(col) for col in zip(*values)]
        ax.fill_between(steps, [m - s for m, s in zip(mean, sd)],
                        [m + s for m, s in zip(mean, sd)], color=line.get_color(), alpha=0.2,
                        linewidth=0)
    ax.set_xlabel("step")
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
  finite = [m for m in means if not math.isnan(m)]
  if finite:
    lo, hi = min(finite), max(m + e for m, e in zip(means, errs) if not math.isnan(m))
    pad = max(1e-6, 0.1 * (hi - lo) or 0.05 * abs(hi))
    ax.set_ylim(lo - pad - max(errs), hi + pad)
  ax.grid(axis="y", alpha=0.3)
  ax.set_title(title or f"final {table.metric} (mean ± std over seeds)")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
