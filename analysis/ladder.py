"""`ablax compare --scaling`: per-variant scaling fits of a ladder sweep, from MLflow.

A ladder sweep's children carry the param `size` (the ladder's axis); a
variant is the sweep variant without it. Each child gives one point: its
training FLOPs (`train/flops`, tokens x flops_per_token, the FLOPs MFU uses)
and its final loss. Per variant the fit is L(C) = E + A C^-alpha
(analysis/scaling.py); intervals come from a seed bootstrap paired across
variants. The report says, per variant: the fit with CIs; the difference to
the baseline at every measured size (Student t over seeds, paired where the
seeds match); whether that difference has one sign at every size; the
difference the fits predict at a target compute, with a bootstrap CI and p;
and the compute multiplier k with L_baseline(k C) = L_variant(C) there.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from typing import Callable, Sequence

from analysis import runs as runs_lib
from analysis import scaling
from analysis import stats
from analysis.table import latex_escape
from core.tracking import schema

SIZE_AXIS = "size"  # the param a ladder point logs its size under (launch/ladder.py)
DEFAULT_AT_FLOPS = 1e21


def strip_size(variant: str) -> str:
  """A ladder point's variant without its size: what the scaling fit groups by."""
  return ",".join(p for p in variant.split(",") if not p.startswith(f"{SIZE_AXIS}="))


@dataclasses.dataclass
class SizeDelta:
  size: str
  flops: float  # mean training FLOPs of the variant's runs at this size
  loss_mean: float
  loss_std: float
  n: int
  delta: stats.Delta | None  # None for the baseline
  energy_kwh: float  # mean per run


@dataclasses.dataclass
class VariantFit:
  variant: str
  baseline: bool
  runs: list[scaling.Run]
  fit: scaling.Fit
  ci: dict[str, tuple[float, float]]  # 'E', 'A', 'alpha'
  sizes: list[SizeDelta]
  sign_stable: bool | None = None  # None for the baseline
  delta_at: float = math.nan  # predicted variant - baseline at the target compute
  delta_at_ci: tuple[float, float] = (math.nan, math.nan)
  delta_at_p: float = math.nan
  multiplier: float = math.nan  # the baseline needs this x the variant's compute
  multiplier_ci: tuple[float, float] = (math.nan, math.nan)
  band: list[tuple[float, float, float]] = dataclasses.field(default_factory=list)  # (C, lo, hi)


@dataclasses.dataclass
class ScalingResult:
  source: str
  metric: str
  baseline: str
  at_flops: float
  confidence: float
  n_boot: int
  variants: list[VariantFit]
  parent: object | None

  def row(self, variant: str) -> VariantFit:
    return next(v for v in self.variants if v.variant == variant)


def _energy(run) -> float:
  return run.data.metrics.get(schema.ENERGY_KWH, math.nan)


def collect(
  c,
  sweep: str,
  metric: str | None = None,
  baseline: str | None = None,
  at_flops: float = DEFAULT_AT_FLOPS,
  confidence: float = 0.95,
  n_boot: int = 1000,
  seed: int = 0,
) -> ScalingResult:
  """Fits every variant of the ladder sweep `sweep` (name or parent run id)."""
  parent = runs_lib.find_sweep(c, sweep)
  children = runs_lib.sweep_children(c, parent)
  name = parent.data.tags.get(runs_lib.SWEEP_TAG, parent.info.run_name)
  source = f"ladder sweep {name} (parent run {parent.info.run_id})"
  if not children:
    raise runs_lib.RunLookupError(f"{source} has no finished child runs yet")
  if not any(SIZE_AXIS in r.data.params for r in children):
    raise scaling.ScalingError(
      f"sweep {name} is not a ladder (its runs have no '{SIZE_AXIS}' "
      f"param); compare it without --scaling"
    )
  metric = metric or parent.data.tags.get(runs_lib.METRIC_TAG) or schema.EVAL_LOSS
  by_variant: dict[str, list] = {}
  for variant, group_runs in runs_lib.group(children).items():
    by_variant.setdefault(strip_size(variant), []).extend(group_runs)
  if baseline is None:
    baseline = strip_size(parent.data.tags.get(runs_lib.BASELINE_TAG, "")) or next(iter(by_variant))
  if baseline not in by_variant:
    raise runs_lib.RunLookupError(
      f"baseline {baseline!r} is not a variant of {source}; variants: {list(by_variant)}"
    )
  points: dict[str, list[scaling.Run]] = {}
  for variant, group_runs in by_variant.items():
    pts = []
    for r in group_runs:
      for key in (metric, schema.FLOPS):
        if key not in r.data.metrics:
          raise runs_lib.RunLookupError(f"run {r.info.run_id} ({variant}) has no metric {key!r}")
      pts.append(
        scaling.Run(
          r.data.params[SIZE_AXIS],
          str(runs_lib.seed_of(r)),
          r.data.metrics[schema.FLOPS],
          r.data.metrics[metric],
        )
      )
    scaling.check_ladder(pts, what=f"{source}, variant {variant},")
    points[variant] = pts
  boots = scaling.bootstrap(points, n_boot=n_boot, seed=seed)
  # One seed at a size leaves nothing to redraw: intervals would be zero-width, not "certain".
  single = sorted(
    v
    for v, pts in points.items()
    if min(sum(1 for p in pts if p.size == s) for s in {p.size for p in pts}) < 2
  )
  if single:
    boots = {v: [None] * n_boot for v in points}
    source += (
      f"; {', '.join(single)} ran one seed at some size, so no bootstrap intervals "
      f"(run at least 2 seeds)"
    )
  fits = {
    v: scaling.fit([p.flops for p in pts], [p.loss for p in pts]) for v, pts in points.items()
  }
  out = []
  base_fit, base_boots = fits[baseline], boots[baseline]
  for variant, pts in points.items():
    f, bs = fits[variant], boots[variant]
    ok = [b for b in bs if b is not None]
    ci = {
      k: scaling.percentile_ci([getattr(b, k) for b in ok], confidence) for k in ("E", "A", "alpha")
    }
    sizes = _size_deltas(
      pts, points[baseline], by_variant[variant], confidence, variant == baseline
    )
    vf = VariantFit(variant, variant == baseline, pts, f, ci, sizes)
    lo_c = min(p.flops for p in pts) / 2
    grid = [lo_c * (2 * at_flops / lo_c) ** (i / 60) for i in range(61)]
    vf.band = [(g, *scaling.percentile_ci([b.predict(g) for b in ok], confidence)) for g in grid]
    if variant != baseline:
      signs = {math.copysign(1.0, s.delta.value) for s in sizes if s.delta and s.delta.value}
      vf.sign_stable = len(signs) == 1 and all(s.delta and s.delta.value for s in sizes)
      vf.delta_at = f.predict(at_flops) - base_fit.predict(at_flops)
      pairs = [(b, bb) for b, bb in zip(bs, base_boots) if b is not None and bb is not None]
      deltas = [b.predict(at_flops) - bb.predict(at_flops) for b, bb in pairs]
      vf.delta_at_ci = scaling.percentile_ci(deltas, confidence)
      vf.delta_at_p = scaling.bootstrap_p(deltas)
      vf.multiplier = scaling.multiplier(base_fit, f, at_flops)
      vf.multiplier_ci = scaling.percentile_ci(
        [scaling.multiplier(bb, b, at_flops) for b, bb in pairs], confidence
      )
    out.append(vf)
  out.sort(key=lambda v: not v.baseline)
  return ScalingResult(source, metric, baseline, at_flops, confidence, n_boot, out, parent)


def _size_deltas(
  pts: Sequence[scaling.Run],
  base: Sequence[scaling.Run],
  mlflow_runs: Sequence,
  confidence: float,
  is_base: bool,
) -> list[SizeDelta]:
  energy = {}
  for r in mlflow_runs:
    energy.setdefault(r.data.params[SIZE_AXIS], []).append(_energy(r))
  sizes = sorted({p.size for p in pts}, key=lambda s: min(p.flops for p in pts if p.size == s))
  out = []
  for s in sizes:
    mine = sorted((p for p in pts if p.size == s), key=lambda p: p.seed)
    theirs = sorted((p for p in base if p.size == s), key=lambda p: p.seed)
    losses = [p.loss for p in mine]
    delta = None
    if not is_base and theirs:
      paired = [p.seed for p in mine] == [p.seed for p in theirs]
      delta = stats.delta_ci(losses, [p.loss for p in theirs], confidence, paired=paired)
    e = [x for x in energy.get(s, []) if not math.isnan(x)]
    out.append(
      SizeDelta(
        s,
        stats.mean([p.flops for p in mine]),
        stats.mean(losses),
        stats.std(losses),
        len(mine),
        delta,
        stats.mean(e) if e else math.nan,
      )
    )
  return out


# ------------------------------------------------------------------ rendering


def _n(x: float, digits: int = 4) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "n/a"
  if math.isinf(x):
    return "inf" if x > 0 else "-inf"
  if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
    return f"{x:.3e}"
  return f"{x:.{digits}f}"


def _ci(lo: float, hi: float, digits: int = 4) -> str:
  return "n/a" if math.isnan(lo) else f"[{_n(lo, digits)}, {_n(hi, digits)}]"


def verdicts(result: ScalingResult) -> list[str]:
  """One sentence per variant: sign stability, the predicted Δ and the compute multiplier."""
  level = round(result.confidence * 100)
  lines = []
  for v in result.variants:
    if v.baseline:
      continue
    signs = ", ".join(f"{s.size} {s.delta.value:+.4f}" for s in v.sizes if s.delta)
    stable = "the same sign at every size" if v.sign_stable else "NOT the same sign at every size"
    lines.append(
      f"{v.variant} vs {result.baseline}: Δ {signs}: {stable}. Predicted Δ at "
      f"{result.at_flops:.3g} FLOPs {v.delta_at:+.4f}, {level}% CI "
      f"{_ci(*v.delta_at_ci)}, bootstrap p {_n(v.delta_at_p, 3)}; {v.variant} is worth "
      f"{_n(v.multiplier, 3)}x compute (the baseline matches it with that multiple of the "
      f"compute), {level}% CI {_ci(*v.multiplier_ci, 3)}."
    )
  return lines


def _fit_rows(result: ScalingResult) -> list[list[str]]:
  rows = []
  for v in result.variants:
    f = v.fit
    rows.append(
      [
        v.variant + (" (baseline)" if v.baseline else ""),
        str(len(v.runs)),
        _n(f.E),
        _ci(*v.ci["E"]),
        _n(f.A, 3),
        _ci(*v.ci["A"], 3),
        _n(f.alpha),
        _ci(*v.ci["alpha"]),
        "" if v.baseline else f"{v.delta_at:+.4f} {_ci(*v.delta_at_ci)}",
        "" if v.baseline else f"{_n(v.multiplier, 3)} {_ci(*v.multiplier_ci, 3)}",
      ]
    )
  return rows


def _fit_head(result: ScalingResult) -> list[str]:
  level = f"{round(result.confidence * 100)}%"
  return [
    "variant",
    "runs",
    "E",
    f"E {level} CI",
    "A",
    f"A {level} CI",
    "alpha",
    f"alpha {level} CI",
    f"Δ at {result.at_flops:.3g} FLOPs [CI]",
    "compute x [CI]",
  ]


def _size_rows(result: ScalingResult) -> list[list[str]]:
  rows = []
  for v in result.variants:
    for s in v.sizes:
      d = s.delta
      rows.append(
        [
          v.variant,
          s.size,
          f"{s.flops:.3e}",
          str(s.n),
          _n(s.loss_mean) + ("" if math.isnan(s.loss_std) else f" ± {_n(s.loss_std)}"),
          "baseline" if v.baseline else (f"{d.value:+.4f}" if d else ""),
          "" if v.baseline or d is None else _ci(d.low, d.high),
          "" if v.baseline or d is None else _n(d.p, 3),
          _n(s.energy_kwh, 6),
        ]
      )
  return rows


def _size_head(result: ScalingResult) -> list[str]:
  level = f"{round(result.confidence * 100)}%"
  return [
    "variant",
    "size",
    "train FLOPs",
    "seeds",
    f"final {result.metric}",
    "Δ vs baseline",
    f"{level} CI",
    "p",
    "energy kWh",
  ]


def _grid(head: list[str], body: list[list[str]]) -> list[str]:
  widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
  return [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]


def _footnote(result: ScalingResult) -> str:
  return (
    f"Fit per variant: L(C) = E + A C^-alpha over every run (seeds as replicates), C = "
    f"training FLOPs (train/flops), L = final {result.metric}; CIs: {result.n_boot} "
    f"bootstrap replicates redrawing each size's seeds (paired across variants), "
    f"percentile intervals. Δ at a size: Student t over seeds (paired on shared seeds). "
    f"compute x: k with L_baseline(k C) = L_variant(C) at C = {result.at_flops:.3g}; "
    f"k > 1 means the variant is worth k times the baseline's compute. Predictions "
    f"beyond the measured compute are extrapolations of the fitted form. Source: "
    f"{result.source}."
  )


def to_text(result: ScalingResult) -> str:
  out = [result.source, "", "Fits:"] + _grid(_fit_head(result), _fit_rows(result))
  out += ["", "Per size:"] + _grid(_size_head(result), _size_rows(result))
  out += [""] + verdicts(result) + ["", _footnote(result)]
  return "\n".join(out)


def to_markdown(result: ScalingResult) -> str:
  def table(head, body):
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] + [
      "| " + " | ".join(c.replace("|", "\\|") for c in b) + " |" for b in body
    ]

  out = table(_fit_head(result), _fit_rows(result)) + [""]
  out += table(_size_head(result), _size_rows(result)) + [""]
  out += [f"- {v}" for v in verdicts(result)] + ["", _footnote(result)]
  return "\n".join(out) + "\n"


def _tex(cell: str) -> str:
  return latex_escape(cell).replace("Δ", r"$\Delta$").replace("±", r"$\pm$")


def to_latex(result: ScalingResult) -> str:
  """Two tabulars: the fits, and per size the FLOPs, loss, Δ and kWh of every variant."""
  out = []
  for head, body in (
    (_fit_head(result), _fit_rows(result)),
    (_size_head(result), _size_rows(result)),
  ):
    out += [
      r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}",
      r"\toprule",
      " & ".join(_tex(h) for h in head) + r" \\",
      r"\midrule",
    ]
    out += [" & ".join(_tex(c) for c in b) + r" \\" for b in body]
    out += [r"\bottomrule", r"\end{tabular}", ""]
  out += ["% " + line for line in verdicts(result) + [_footnote(result)]]
  return "\n".join(out) + "\n"


def to_csv(result: ScalingResult) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(
    [
      "variant",
      "baseline",
      "size",
      "flops",
      "seeds",
      "loss_mean",
      "loss_std",
      "delta",
      "delta_low",
      "delta_high",
      "p",
      "energy_kwh",
      "E",
      "E_low",
      "E_high",
      "A",
      "A_low",
      "A_high",
      "alpha",
      "alpha_low",
      "alpha_high",
      "at_flops",
      "delta_at",
      "delta_at_low",
      "delta_at_high",
      "delta_at_p",
      "multiplier",
      "multiplier_low",
      "multiplier_high",
      "sign_stable",
    ]
  )
  f = lambda x: "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(x)  # noqa: E731
  for v in result.variants:
    for s in v.sizes:
      d = s.delta
      w.writerow(
        [
          v.variant,
          int(v.baseline),
          s.size,
          f(s.flops),
          s.n,
          f(s.loss_mean),
          f(s.loss_std),
          f(d and d.value),
          f(d and d.low),
          f(d and d.high),
          f(d and d.p),
          f(s.energy_kwh),
          f(v.fit.E),
          *map(f, v.ci["E"]),
          f(v.fit.A),
          *map(f, v.ci["A"]),
          f(v.fit.alpha),
          *map(f, v.ci["alpha"]),
          f(result.at_flops),
          f(v.delta_at),
          *map(f, v.delta_at_ci),
          f(v.delta_at_p),
          f(v.multiplier),
          *map(f, v.multiplier_ci),
          "" if v.sign_stable is None else int(v.sign_stable),
        ]
      )
  return buf.getvalue()


FORMATS: dict[str, Callable[[ScalingResult], str]] = {
  "text": to_text,
  "markdown": to_markdown,
  "latex": to_latex,
  "csv": to_csv,
}


def render(result: ScalingResult, fmt: str) -> str:
  if fmt not in FORMATS:
    raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
  return FORMATS[fmt](result)


# ------------------------------------------------------------------ record


def metrics_of(result: ScalingResult) -> dict[str, float]:
  """scaling/<variant>/<name> -> value: the fits, CIs, predicted Δ and multiplier."""
  from core.tracking.store import clean_key  # pylint: disable=g-import-not-at-top

  out = {}
  for v in result.variants:
    values = {
      "E": v.fit.E,
      "E_low": v.ci["E"][0],
      "E_high": v.ci["E"][1],
      "A": v.fit.A,
      "A_low": v.ci["A"][0],
      "A_high": v.ci["A"][1],
      "alpha": v.fit.alpha,
      "alpha_low": v.ci["alpha"][0],
      "alpha_high": v.ci["alpha"][1],
    }
    if not v.baseline:
      values.update(
        {
          "delta_at": v.delta_at,
          "delta_at_low": v.delta_at_ci[0],
          "delta_at_high": v.delta_at_ci[1],
          "delta_at_p": v.delta_at_p,
          "multiplier": v.multiplier,
          "multiplier_low": v.multiplier_ci[0],
          "multiplier_high": v.multiplier_ci[1],
          "sign_stable": float(bool(v.sign_stable)),
        }
      )
    for k, x in values.items():
      if x is not None and math.isfinite(x):
        out[clean_key(f"{schema.SCALING}{v.variant}/{k}")] = float(x)
  out[f"{schema.SCALING}at_flops"] = float(result.at_flops)
  return out


def log_result(c, result: ScalingResult, paths: Sequence = ()) -> None:
  """The fits as parent-run metrics, the per-size rows as an MLflow table, the files as artifacts."""
  import time  # pylint: disable=g-import-not-at-top
  from mlflow.entities import Metric  # pylint: disable=g-import-not-at-top

  run_id = result.parent.info.run_id
  now = int(time.time() * 1000)
  metrics = [Metric(k, v, now, 0) for k, v in metrics_of(result).items()]
  for i in range(0, len(metrics), 1000):
    c.log_batch(run_id, metrics=metrics[i : i + 1000])
  rows = list(csv.DictReader(io.StringIO(to_csv(result))))
  c.log_table(
    run_id, data={k: [r[k] for r in rows] for k in rows[0]}, artifact_file="scaling/table.json"
  )
  for path in paths:
    c.log_artifact(run_id, str(path), "scaling")


def save(c, result: ScalingResult, out_dir, log_to_parent: bool = True) -> list:
  """Writes scaling.png and the report in every format; logs them and the metrics to the parent."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  from analysis import plots  # pylint: disable=g-import-not-at-top

  out_dir = Path(out_dir or tempfile.mkdtemp(prefix="ablax-scaling-"))
  paths = [plots.scaling_fits(result, out_dir / "scaling.png")]
  for fmt, ext in (("text", "txt"), ("markdown", "md"), ("csv", "csv"), ("latex", "tex")):
    path = out_dir / f"scaling.{ext}"
    path.write_text(render(result, fmt))
    paths.append(path)
  if log_to_parent and result.parent is not None:
    log_result(c, result, paths)
  return paths
