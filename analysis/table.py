"""The comparison table: one row per variant, statistics over seeds, citable run ids.

Each row holds the final value of the ranking metric (mean and standard
deviation over seeds), its perplexity, the difference to the baseline variant
with a Student-t confidence interval, mean throughput and MFU, total energy
and carbon, and the run ids and config hashes a paper can cite.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from typing import Any, Callable, Sequence

from analysis import axes
from analysis import runs as runs_lib
from analysis import stats
from core.tracking import schema

# Column -> the trainer's metric (core.tracking.schema: one spelling, the one it writes).
PERPLEXITY_KEYS: tuple[str, ...] = ()  # the trainer logs losses; perplexity is exp(loss) here
TOKENS_PER_S_KEYS = (schema.TOKENS_PER_S,)
MFU_KEYS = (schema.MFU,)
# Energy before PUE scaling (core/tracking/energy.py keeps raw and PUE-scaled apart).
ENERGY_KEYS = (schema.ENERGY_KWH,)
CARBON_KEYS = (schema.CO2_KG,)
FALLBACK_LOSS_KEYS = (schema.EVAL_LOSS, schema.TRAIN_LOSS)


@dataclasses.dataclass
class Row:
  variant: str
  n: int
  seeds: list[str]
  metric: str
  final: list[float]
  mean: float
  std: float
  ppl_mean: float
  ppl_std: float
  delta: stats.Delta | None
  tokens_per_s: float
  mfu: float
  energy_kwh: float
  carbon_kg: float
  run_ids: list[str]
  config_hashes: list[str]
  baseline: bool = False
  eval_se: float = float("nan")  # the eval set's standard error of the metric (mean over runs)
  # The metric at the table's compute match (Table.matched): per run, mean, std, Δ to baseline.
  matched: list[float] = dataclasses.field(default_factory=list)
  matched_mean: float = float("nan")
  matched_std: float = float("nan")
  matched_delta: stats.Delta | None = None


@dataclasses.dataclass
class Table:
  rows: list[Row]
  metric: str
  baseline: str | None
  confidence: float
  source: str  # what was compared: "sweep NAME (parent RUN_ID)" or an experiment + filter
  at: tuple[str, float] | None = (
    None  # compute match (analysis.axes): ('tokens', 1e6); None = final
  )
  # With final values (at None), also every run at the largest FLOPs budget all of them reached:
  # equal steps favour the variant that spends more FLOPs per step.
  matched: tuple[str, float] | None = None

  @property
  def match(self) -> str:
    """How runs were matched: 'final' (each run's last value) or e.g. 'tokens=1e+06'."""
    return "final" if self.at is None else f"{self.at[0]}={self.at[1]:.4g}"

  def row(self, variant: str) -> Row:
    return next(r for r in self.rows if r.variant == variant)

  def unresolved(self) -> list[str]:
    """Variants whose Δ is within 2 standard errors of the eval set: noise this set can't split."""
    base = next((r for r in self.rows if r.baseline), None)
    if base is None or math.isnan(base.eval_se):
      return []
    out = []
    for r in self.rows:
      if r.baseline or r.delta is None or math.isnan(r.eval_se):
        continue
      floor = 2 * math.sqrt(r.eval_se**2 + base.eval_se**2)
      if abs(r.delta.value) < floor:
        out.append(f"{r.variant} (|Δ| {abs(r.delta.value):.4f} < {floor:.4f})")
    return out


def _first(run, keys: Sequence[str]) -> tuple[str | None, float]:
  key = runs_lib.pick_metric(run, keys)
  return key, (run.data.metrics[key] if key else stats.NAN)


def _mean_history(c, run, keys: Sequence[str]) -> float:
  """Mean over logged steps, leaving out the first (it includes compilation)."""
  key = runs_lib.pick_metric(run, keys)
  if key is None:
    return stats.NAN
  values = [p.value for p in runs_lib.history(c, run.info.run_id, key)]
  values = values[1:] if len(values) > 1 else values
  return stats.mean(values)


def _nanmean(xs: Sequence[float]) -> float:
  xs = [x for x in xs if not math.isnan(x)]
  return stats.mean(xs)


def build(
  c,
  groups: dict[str, list],
  metric: str,
  baseline: str | None = None,
  confidence: float = 0.95,
  source: str = "",
  at: tuple[str, float] | None = None,
) -> Table:
  """Statistics per variant; `baseline` is a variant name (None: no deltas).

  `at` ('tokens', N) or ('flops', F) compares every run at that point of its
  curve (analysis.axes.value_at) instead of at its last value.
  """
  if not groups:
    raise runs_lib.RunLookupError(f"no finished runs to compare ({source})")
  rows = []
  for variant, group_runs in groups.items():
    finals, ppls, keys = [], [], set()
    for run in group_runs:
      key = metric if metric in run.data.metrics else None
      if key is None:
        raise runs_lib.RunLookupError(
          f"run {run.info.run_id} ({variant}) has no metric {metric!r}; it has "
          f"{sorted(run.data.metrics)[:20]} (choose one with --metric)"
        )
      keys.add(key)
      final = run.data.metrics[key] if at is None else axes.value_at(c, run, key, *at)
      finals.append(final)
      ppl_key, ppl = _first(run, PERPLEXITY_KEYS)
      ppls.append(ppl if ppl_key and "loss" in metric else _exp(final))
    rows.append(
      Row(
        variant=variant,
        n=len(group_runs),
        seeds=[str(runs_lib.seed_of(r)) for r in group_runs],
        metric=metric,
        final=finals,
        mean=stats.mean(finals),
        std=stats.std(finals),
        ppl_mean=stats.mean(ppls),
        ppl_std=stats.std(ppls),
        delta=None,
        tokens_per_s=_nanmean([_mean_history(c, r, TOKENS_PER_S_KEYS) for r in group_runs]),
        mfu=_nanmean([_mean_history(c, r, MFU_KEYS) for r in group_runs]),
        energy_kwh=_nanmean([_first(r, ENERGY_KEYS)[1] for r in group_runs]),
        carbon_kg=_nanmean([_first(r, CARBON_KEYS)[1] for r in group_runs]),
        run_ids=[r.info.run_id for r in group_runs],
        config_hashes=sorted({runs_lib.config_hash(r) for r in group_runs}),
        eval_se=_nanmean(
          [
            r.data.metrics.get(schema.EVAL_LOSS_SE, stats.NAN)
            if metric == schema.EVAL_LOSS
            else stats.NAN
            for r in group_runs
          ]
        ),
      )
    )
  if baseline is not None and baseline not in groups:
    raise runs_lib.RunLookupError(
      f"baseline variant {baseline!r} has no finished runs; variants: {list(groups)}"
    )
  matched = None
  if at is None:
    # Each run's curve is read once: it gives both the common budget and the values there.
    curves = _flops_curves(c, groups, metric)
    matched = _flops_match(curves)
  if matched is not None:
    for row, group_runs in zip(rows, groups.values()):
      row.matched = [
        axes.interpolate(*curves[r.info.run_id], matched[1], r.info.run_id, metric, "flops")
        for r in group_runs
      ]
      row.matched_mean, row.matched_std = stats.mean(row.matched), stats.std(row.matched)
  if baseline is not None:
    base = next(r for r in rows if r.variant == baseline)
    base.baseline = True
    for row in rows:
      paired = row.seeds == base.seeds and "None" not in row.seeds
      row.delta = stats.delta_ci(row.final, base.final, confidence, paired=paired)
      if matched is not None:
        row.matched_delta = stats.delta_ci(row.matched, base.matched, confidence, paired=paired)
    tested = [r for r in rows if not r.baseline]
    for row, p in zip(tested, stats.holm([r.delta.p for r in tested])):
      row.delta = dataclasses.replace(row.delta, p_holm=p)
    if matched is not None:
      for row, p in zip(tested, stats.holm([r.matched_delta.p for r in tested])):
        row.matched_delta = dataclasses.replace(row.matched_delta, p_holm=p)
  return Table(rows, metric, baseline, confidence, source, at, matched)


def _flops_curves(c, groups: dict[str, list], metric: str) -> dict[str, tuple] | None:
  """run id -> (FLOPs, metric) curve; None when a run lacks the FLOPs params (older records)."""
  try:
    return {
      r.info.run_id: axes.curve(c, r, metric, "flops") for group in groups.values() for r in group
    }
  except axes.AxisError:
    return None


def _flops_match(curves: dict[str, tuple] | None) -> tuple[str, float] | None:
  """('flops', F): the largest training FLOPs at which every run's curve has the metric.

  None without curves, or when they do not overlap; the table then shows final
  values only.
  """
  if not curves or not all(xs for xs, _ in curves.values()):
    return None
  lo = max(xs[0] for xs, _ in curves.values())
  hi = min(xs[-1] for xs, _ in curves.values())
  return ("flops", hi) if lo <= hi else None


def _exp(x: float) -> float:
  try:
    return math.exp(x)
  except OverflowError:
    return math.inf


# ------------------------------------------------------------------ formats


def _num(x: float, digits: int = 4) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "n/a"
  if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
    return f"{x:.3e}"
  return f"{x:.{digits}f}"


def _pm(m: float, s: float, digits: int = 4) -> str:
  return _num(m, digits) if math.isnan(s) else f"{_num(m, digits)} ± {_num(s, digits)}"


def _delta(row: Row, digits: int = 4) -> tuple[str, str, str]:
  if row.baseline:
    return "baseline", "", ""
  if row.delta is None:
    return "", "", ""
  d = row.delta
  sign = "+" if d.value >= 0 else ""
  ci = "n/a" if math.isnan(d.low) else f"[{_num(d.low, digits)}, {_num(d.high, digits)}]"
  p = "n/a" if math.isnan(d.p_holm) else f"{d.p_holm:.3g}"
  return f"{sign}{_num(d.value, digits)}", ci, p


# The terminal table shows prefixes (unambiguous in practice) to stay readable; Markdown and
# LaTeX give full run ids (MLflow looks runs up by the full id) and 16-digit hashes; CSV all in full.
ID_PREFIX = {"text": 8, "markdown": None, "latex": None, "csv": None}
HASH_PREFIX = {"text": 12, "markdown": 16, "latex": 16, "csv": None}


def _ids(values: Sequence[str], n: int | None) -> list[str]:
  return [v if n is None or v.startswith("params:") else v[:n] for v in values]


def _cells(table: Table, row: Row, plus_minus: str = "±", fmt: str = "text") -> list[str]:
  delta, ci, p = _delta(row)
  pm = lambda m, s, d=4: _pm(m, s, d).replace("±", plus_minus)  # noqa: E731
  matched = []
  if table.matched is not None:
    m_delta, _, m_p = _delta(dataclasses.replace(row, delta=row.matched_delta))
    matched = [
      pm(row.matched_mean, row.matched_std),
      m_delta if row.baseline else f"{m_delta} (p {m_p})",
    ]
  return [
    row.variant,
    str(row.n),
    pm(row.mean, row.std),
    _num(row.eval_se, 4),
    pm(row.ppl_mean, row.ppl_std, 2),
    delta,
    ci,
    p,
    *matched,
    _num(row.tokens_per_s, 1),
    _num(row.mfu, 4),
    _num(row.energy_kwh, 6),
    _num(row.carbon_kg, 6),
    " ".join(_ids(row.run_ids, ID_PREFIX[fmt])),
    " ".join(_ids(row.config_hashes, HASH_PREFIX[fmt])),
  ]


def headers(table: Table) -> list[str]:
  level = f"{round(table.confidence * 100):d}%"
  what = "final" if table.at is None else f"at {table.match}:"
  matched = []
  if table.matched is not None:
    matched = [f"at flops={table.matched[1]:.3g}", "Δ at flops"]
  return [
    "variant",
    "seeds",
    f"{what} {table.metric}",
    "eval SE",
    "perplexity",
    "Δ vs baseline",
    f"{level} CI",
    "p (Holm)",
    *matched,
    "tokens/s",
    "MFU",
    "energy kWh",
    "carbon kg CO2e",
    "run ids",
    "config hash",
  ]


def to_text(table: Table) -> str:
  head = headers(table)
  body = [_cells(table, r) for r in table.rows]
  widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
  out = [f"{table.source}", line(head), line(["-" * w for w in widths])]
  out += [line(b) for b in body]
  out.append(
    _footnote(table) + " Run ids and hashes are prefixes here; --format csv gives them in full."
  )
  return "\n".join(out)


def to_markdown(table: Table) -> str:
  esc = lambda s: s.replace("|", "\\|")  # noqa: E731
  head = headers(table)
  out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
  for r in table.rows:
    cells = _cells(table, r, fmt="markdown")
    cells[-2] = " ".join(f"`{i}`" for i in r.run_ids)
    cells[-1] = " ".join(f"`{h}`" for h in _ids(r.config_hashes, HASH_PREFIX["markdown"]))
    out.append("| " + " | ".join(esc(c) for c in cells) + " |")
  return "\n".join(out) + f"\n\n{_footnote(table)}\n"


_LATEX_SPECIAL = {
  "&": r"\&",
  "%": r"\%",
  "$": r"\$",
  "#": r"\#",
  "_": r"\_",
  "{": r"\{",
  "}": r"\}",
  "~": r"\textasciitilde{}",
  "^": r"\textasciicircum{}",
  "\\": r"\textbackslash{}",
}


def latex_escape(text: str) -> str:
  return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
  head = [latex_escape(h).replace("Δ", r"$\Delta$") for h in headers(table)]
  out = [
    r"\begin{tabular}{l r " + " ".join("r" for _ in head[2:-2]) + " l l}",
    r"\toprule",
    " & ".join(head) + r" \\",
    r"\midrule",
  ]
  for r in table.rows:
    cells = [latex_escape(c) for c in _cells(table, r, plus_minus="PLUSMINUS", fmt="latex")]
    cells = [c.replace("PLUSMINUS", r"$\pm$") for c in cells]
    cells[-2] = r"\texttt{" + r" ".join(latex_escape(i) for i in r.run_ids) + "}"
    cells[-1] = (
      r"\texttt{"
      + r" ".join(latex_escape(h) for h in _ids(r.config_hashes, HASH_PREFIX["latex"]))
      + "}"
    )
    out.append(" & ".join(cells) + r" \\")
  out += [r"\bottomrule", r"\end{tabular}", "% " + _footnote(table).replace("\n", "\n% ")]
  return "\n".join(out) + "\n"


def to_csv(table: Table) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  level = round(table.confidence * 100)
  w.writerow(
    [
      "variant",
      "baseline",
      "seeds",
      "n",
      "metric",
      "mean",
      "std",
      "eval_se",
      "perplexity_mean",
      "perplexity_std",
      "delta",
      f"ci{level}_low",
      f"ci{level}_high",
      "ci_method",
      "p",
      "p_holm",
      "tokens_per_s",
      "mfu",
      "energy_kwh",
      "carbon_kg_co2e",
      "run_ids",
      "config_hashes",
      "matched_flops",
      "matched_mean",
      "matched_std",
      "matched_delta",
      "matched_p_holm",
    ]
  )
  f = lambda x: "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(x)  # noqa: E731
  for r in table.rows:
    d = r.delta
    w.writerow(
      [
        r.variant,
        int(r.baseline),
        " ".join(r.seeds),
        r.n,
        r.metric,
        f(r.mean),
        f(r.std),
        f(r.eval_se),
        f(r.ppl_mean),
        f(r.ppl_std),
        f(d.value if d else None),
        f(d.low if d else None),
        f(d.high if d else None),
        d.method if d else "",
        f(d.p if d else None),
        f(d.p_holm if d else None),
        f(r.tokens_per_s),
        f(r.mfu),
        f(r.energy_kwh),
        f(r.carbon_kg),
        " ".join(r.run_ids),
        " ".join(r.config_hashes),
        f(table.matched[1] if table.matched else None),
        f(r.matched_mean),
        f(r.matched_std),
        f(r.matched_delta.value if r.matched_delta else None),
        f(r.matched_delta.p_holm if r.matched_delta else None),
      ]
    )
  return buf.getvalue()


def _footnote(table: Table) -> str:
  methods = sorted({r.delta.method for r in table.rows if r.delta and not r.baseline})
  how = {
    "paired": "paired t over shared seeds",
    "welch": "Welch t",
    "none": "no interval with one seed",
  }
  where = (
    "the final"
    if table.at is None
    else f"{table.match} (each run's curve interpolated linearly there, not extrapolated) of the"
  )
  matched = (
    ""
    if table.matched is None
    else f"'at flops': every run at {table.matched[1]:.4g} training FLOPs, the largest budget "
    f"all of them reached (their curves interpolated linearly there), so a variant "
    f"that spends fewer FLOPs per step is compared at equal compute; its Δ has the same "
    f"test and Holm adjustment. "
  )
  return (
    f"Mean ± sample std over seeds of {where} {table.metric}; Δ = variant - baseline, "
    f"{round(table.confidence * 100)}% CI by {', '.join(how[m] for m in methods) or 'n/a'}; "
    f"p: the same t test, Holm-adjusted over the variants compared with the baseline. "
    f"eval SE: the eval set's own standard error (token-loss std / sqrt(tokens)), the "
    f"noise floor next to the seed std. {matched}"
    f"tokens/s and MFU: mean over logged steps after the first; energy and carbon: "
    f"mean per run. Source: {table.source}."
    + (
      f"\nWARNING: the eval set cannot resolve {', '.join(table.unresolved())}: a "
      f"larger eval set (train.eval_batches) is needed to tell these apart."
      if table.unresolved()
      else ""
    )
  )


FORMATS: dict[str, Callable[[Table], str]] = {
  "text": to_text,
  "markdown": to_markdown,
  "latex": to_latex,
  "csv": to_csv,
}


def render(table: Table, fmt: str) -> str:
  if fmt not in FORMATS:
    raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
  return FORMATS[fmt](table)


def as_records(table: Table) -> list[dict[str, Any]]:
  return [dataclasses.asdict(r) for r in table.rows]
