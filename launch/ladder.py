"""Size ladders: a sweep's variants trained at K model sizes, each on a token budget.

A sweep file adds `ladder` to `launch.sweep.Sweep`:

  ladder = {
      'sizes': {                       # K sizes, smallest first
          'd64': ['core.model.config.ModelConfig.embed_dim = 64', ...],
          'd96': 'ablations/ladders/d96.gin',
      },
      'tokens_per_param': 20,          # Chinchilla: tokens = 20 x non-embedding parameters
      # or 'tokens': {'d64': 1e6, 'd96': 2e6},  explicit per size
      'warmup_fraction': 0.1,          # optional; default: the base's warmup / steps
  }

The ladder is one more axis of the grid, `size`, after the sweep's own axes
(every variant x size x seed is a point). A size's bindings are applied
before the variants' (after the base and `params`), so a variant changes the
model the size describes. The budget is the baseline variant's at that size:
every variant of one size trains on the same tokens, and variants that cost
more or fewer FLOPs per token sit at their own compute on the fit's x axis.
Steps are tokens / (global batch x sequence length); the optimizer recipe's
warmup_steps is that fraction of the steps and its decay ends at num_steps
(core/train/optimizer.py), so each size runs a whole schedule.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from analysis.ladder import SIZE_AXIS as AXIS  # the grid axis a ladder adds (a child param)
from analysis.ladder import strip_size
from launch import gin_config
from launch import sweep as sweep_lib

STEPS_BINDING = "core.train.loop.train.num_steps"
BATCH_BINDING = "core.train.loop.train.batch_size"
OPTIMIZER_BINDING = "core.train.loop.train.optimizer"
SEQ_LEN_BINDING = "core.data.pipeline.lm_batches.seq_len"
EVAL_EVERY_BINDING = "core.train.loop.train.eval_every"
EVAL_BATCHES_BINDING = "core.train.loop.train.eval_batches"
KEYS = ("sizes", "tokens_per_param", "tokens", "warmup_fraction")

# CPU time model of one point on one core: a fixed start (interpreter, jax import, data,
# compiling the train and eval steps), a cost per token that FLOPs do not count (at tiny widths
# the vocabulary's softmax and the per-op dispatch: throughput was the same ~6k tok/s at batch 8
# and 32), and model FLOPs (training and evaluation) at a sustained rate. Fitted by least squares
# to the 40 points of ablations/ladder_{activation,attention}.gin (2 workers, one pinned core
# each): median error 3%, where FLOPs alone at 50 GFLOP/s were off by 74%. The machine's float32
# matmul peak read 96 GFLOP/s during that run, so on an idle machine the estimate runs high.
CPU_START_S = 23.0
CPU_S_PER_TOKEN = 8.0e-5
CPU_FLOPS_PER_CORE_S = 2.7e10


@dataclasses.dataclass(frozen=True)
class Size:
  """One rung: its bindings and its budget (from the baseline variant at this size)."""

  label: str
  entries: tuple[str, ...]
  non_embedding: int
  total: int
  batch: int
  seq_len: int
  tokens: int  # steps x batch x seq_len (the budget rounded to whole steps)
  steps: int
  warmup_steps: int
  warmup_binding: str

  @property
  def bindings(self) -> list[str]:
    return [f"{STEPS_BINDING} = {self.steps}", f"{self.warmup_binding} = {self.warmup_steps}"]


def check_shape(sweep: sweep_lib.Sweep) -> sweep_lib.Axis | None:
  """The ladder as a grid axis (None without one); SweepError for a malformed ladder."""
  spec = sweep.ladder
  if spec is None:
    return None
  where = f"sweep {sweep.name}: ladder"
  if not isinstance(spec, Mapping):
    raise sweep_lib.SweepError(
      f"{where} must be a dict with 'sizes' and a budget "
      f"('tokens_per_param' or 'tokens'), got {type(spec).__name__}"
    )
  unknown = sorted(set(spec) - set(KEYS))
  if unknown:
    raise sweep_lib.SweepError(f"{where}: unknown key(s) {unknown}; it takes {list(KEYS)}")
  if AXIS in sweep.axes:
    raise sweep_lib.SweepError(f"sweep {sweep.name}: axis '{AXIS}' is the ladder's; rename it")
  sizes = spec.get("sizes")
  if not isinstance(sizes, Mapping) or not sizes:
    raise sweep_lib.SweepError(
      f"{where}: 'sizes' must name the sizes, {{label: [bindings or .gin files]}}"
    )
  if ("tokens_per_param" in spec) == ("tokens" in spec):
    raise sweep_lib.SweepError(
      f"{where}: give exactly one budget, 'tokens_per_param' (e.g. 20, "
      f"Chinchilla) or 'tokens' ({{size: tokens}})"
    )
  if "tokens_per_param" in spec:
    rule = spec["tokens_per_param"]
    if not isinstance(rule, (int, float)) or isinstance(rule, bool) or not rule > 0:
      raise sweep_lib.SweepError(
        f"{where}: tokens_per_param must be a positive number, got {rule!r}"
      )
  else:
    tokens = spec["tokens"]
    if not isinstance(tokens, Mapping) or set(map(str, tokens)) != set(map(str, sizes)):
      raise sweep_lib.SweepError(
        f"{where}: 'tokens' must give every size its budget: sizes "
        f"{list(sizes)}, got {list(tokens) if isinstance(tokens, Mapping) else tokens!r}"
      )
    for label, n in tokens.items():
      if not isinstance(n, (int, float)) or isinstance(n, bool) or not n > 0:
        raise sweep_lib.SweepError(
          f"{where}: tokens[{label!r}] must be a positive number, got {n!r}"
        )
  fraction = spec.get("warmup_fraction")
  if fraction is not None and (not isinstance(fraction, (int, float)) or not 0 <= fraction < 1):
    raise sweep_lib.SweepError(f"{where}: warmup_fraction must be in [0, 1), got {fraction!r}")
  return sweep_lib.parse_axis(sweep.name, AXIS, dict(sizes))


def _query(name: str, where: str):
  import gin  # pylint: disable=g-import-not-at-top

  try:
    return gin_config.resolve_macro(gin.query_parameter(name))
  except ValueError:
    raise sweep_lib.SweepError(f"{where}: the configuration does not bind {name}") from None


def _configure(files: Sequence[str], params: Sequence[str], where: str):
  """Parses a configuration; returns (ModelConfig, batch, seq_len, optimizer selector).

  Leaves gin holding the configuration (the caller clears it).
  """
  import gin  # pylint: disable=g-import-not-at-top
  from core.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  logging.getLogger().addFilter(sweep_lib.QUIET)
  try:
    gin_config.parse(files, params)
    model = gin_config.build(ModelConfig, files)
  except (gin_config.GinConfigError, ValueError, TypeError) as e:
    raise sweep_lib.SweepError(f"{where}: {e}") from None
  finally:
    logging.getLogger().removeFilter(sweep_lib.QUIET)
  optimizer = _query(OPTIMIZER_BINDING, where)
  selector = getattr(getattr(optimizer, "configurable", None), "selector", None)
  if selector is None:
    raise sweep_lib.SweepError(
      f"{where}: {OPTIMIZER_BINDING} is not a configurable recipe "
      f"(core/train/optimizer.py); the ladder cannot scale its schedule"
    )
  return model, int(_query(BATCH_BINDING, where)), int(_query(SEQ_LEN_BINDING, where)), selector


def sizes(sweep: sweep_lib.Sweep, axes: Sequence[sweep_lib.Axis]) -> list[Size]:
  """Every size's parameters and budget, from the baseline variant's configuration there."""
  import gin  # pylint: disable=g-import-not-at-top
  from core.model.flops import param_counts  # pylint: disable=g-import-not-at-top

  ladder = check_shape(sweep)
  if ladder is None:
    return []
  chosen = {k: str(v) for k, v in (sweep.baseline or {}).items()}
  base_entries = []
  for a in (a for a in axes if a.name != AXIS):
    base_entries += a.entries[a.labels.index(chosen.get(a.name, a.labels[0]))]
  spec = sweep.ladder
  out = []
  try:
    for label, entries in zip(ladder.labels, ladder.entries):
      where = f"sweep {sweep.name}: ladder size {label!r}"
      files, params = sweep_lib.split_entries(list(entries) + base_entries)
      model, batch, seq_len, selector = _configure(
        list(sweep.base) + files, list(sweep.params) + params, where
      )
      warmup_binding = f"{selector}.warmup_steps"
      fraction = spec.get("warmup_fraction")
      if fraction is None:
        base_steps, base_warmup = _query(STEPS_BINDING, where), _query(warmup_binding, where)
        fraction = float(base_warmup) / float(base_steps) if base_steps else 0.0
      counts = param_counts(model)
      if "tokens_per_param" in spec:
        budget = float(spec["tokens_per_param"]) * counts["non_embedding"]
      else:
        budget = float({str(k): v for k, v in spec["tokens"].items()}[label])
      steps = max(1, round(budget / (batch * seq_len)))
      out.append(
        Size(
          label,
          tuple(entries),
          counts["non_embedding"],
          counts["total"],
          batch,
          seq_len,
          steps * batch * seq_len,
          steps,
          int(round(fraction * steps)),
          warmup_binding,
        )
      )
  finally:
    gin.clear_config()
  return out


# ------------------------------------------------------------------ dry run


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A point's size, compute and CPU time (from its own configuration, variant included)."""

  point: Any  # launch.sweep.Point
  size: Size
  non_embedding: int
  total: int
  flops_per_token: float
  flops: float  # training FLOPs: tokens x flops_per_token (what MFU and train/flops use)
  eval_flops: float
  cpu_s: float  # on one core


def estimate(point, size: Size) -> Estimate:
  """The point's FLOPs from its configuration (core/model/flops.py) and its CPU time on one core."""
  import gin  # pylint: disable=g-import-not-at-top
  from core.model.flops import flops_per_token, param_counts  # pylint: disable=g-import-not-at-top

  where = f"point {point.variant} seed {point.seed}"
  try:
    model, batch, seq_len, _ = _configure(point.gin_files, point.gin_params, where)
    every = int(_query(EVAL_EVERY_BINDING, where) or 0)
    eval_batches = int(_query(EVAL_BATCHES_BINDING, where) or 0)
  finally:
    gin.clear_config()
  fpt = flops_per_token(model, seq_len)
  flops = size.steps * batch * seq_len * fpt
  evals = (len(range(every, size.steps, every)) if every else 0) + (1 if eval_batches else 0)
  eval_flops = (
    evals * eval_batches * batch * seq_len * flops_per_token(model, seq_len, training=False)
  )
  tokens = (size.steps + evals * eval_batches) * batch * seq_len
  cpu_s = CPU_START_S + tokens * CPU_S_PER_TOKEN + (flops + eval_flops) / CPU_FLOPS_PER_CORE_S
  counts = param_counts(model)
  return Estimate(
    point, size, counts["non_embedding"], counts["total"], fpt, flops, eval_flops, cpu_s
  )


def estimates(sweep: sweep_lib.Sweep, points: Sequence) -> list[Estimate]:
  by_label = {s.label: s for s in sizes(sweep, sweep_lib.check_shape(sweep))}
  cache: dict[tuple, Estimate] = {}
  out = []
  for p in points:
    label = dict(p.choices)[AXIS]
    key = (p.variant,)  # seeds of one variant x size share the configuration
    if key not in cache:
      cache[key] = estimate(p, by_label[label])
    out.append(dataclasses.replace(cache[key], point=p))
  return out


def _si(x: float) -> str:
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:.3g}"


def print_ladder(sweep: sweep_lib.Sweep, points: Sequence, workers: int, cores: int) -> None:
  """The ladder table of `--dry-run`: parameters, tokens, FLOPs and CPU time per point."""
  rows = estimates(sweep, points)
  flops = [r.flops for r in rows]
  print(
    f"ladder: {len({r.size.label for r in rows})} sizes, budget "
    + (
      f"{sweep.ladder['tokens_per_param']:g} tokens per non-embedding parameter (of the "
      f"baseline variant at each size)"
      if "tokens_per_param" in sweep.ladder
      else "explicit tokens per size"
    )
    + f"; training FLOPs span {max(flops) / min(flops):.1f}x"
  )
  head = [
    "#",
    "variant",
    "seed",
    "non-emb params",
    "total params",
    "tokens",
    "steps",
    "warmup",
    "FLOPs/token",
    "train FLOPs",
    "est. CPU s (1 core)",
  ]
  body = [
    [
      str(r.point.index),
      r.point.variant,
      str(r.point.seed),
      f"{r.non_embedding:,}",
      f"{r.total:,}",
      _si(r.size.tokens),
      str(r.size.steps),
      str(r.size.warmup_steps),
      _si(r.flops_per_token),
      f"{r.flops:.3e}",
      f"{r.cpu_s:.0f}",
    ]
    for r in rows
  ]
  widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
  print("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths)))
  for b in body:
    print("  " + "  ".join(c.ljust(w) for c, w in zip(b, widths)))
  total = sum(r.cpu_s for r in rows)
  wall = _makespan([r.cpu_s for r in rows], workers) * max(1.0, workers / max(cores, 1))
  print(
    f"estimated CPU time: {total / 60:.1f} core-minutes in all; about {wall / 60:.1f} min "
    f"wall on {cores} core(s) with {workers} worker(s) (one core per worker; model "
    f"{CPU_START_S:g} s start + {CPU_S_PER_TOKEN * 1e6:g} us per token + FLOPs at "
    f"{CPU_FLOPS_PER_CORE_S / 1e9:g} GFLOP/s per core, training and evaluation)"
  )


def _makespan(seconds: Sequence[float], workers: int) -> float:
  """Wall time of running the jobs in order on `workers` (each takes the next free worker)."""
  free = [0.0] * max(1, workers)
  for s in seconds:
    i = free.index(min(free))
    free[i] += s
  return max(free)


def size_of(point) -> str | None:
  return dict(point.choices).get(AXIS)


def check_distinct(sweep: sweep_lib.Sweep, points: Sequence) -> None:
  """SweepError when a variant's configuration at some size is the baseline's.

  A size's bindings come after every overlay file (gin applies bindings last), so
  a size that binds what a variant's .gin file sets silently undoes the variant.
  """
  import gin  # pylint: disable=g-import-not-at-top

  baseline = sweep_lib.baseline_variant(sweep)
  base_parts = [p for p in baseline.split(",") if not p.startswith(f"{AXIS}=")]
  first_seed = list(sweep.seeds)[0]
  configs: dict[tuple[str, str], str] = {}
  import logging  # pylint: disable=g-import-not-at-top

  logging.getLogger().addFilter(sweep_lib.QUIET)
  try:
    for p in points:
      if p.seed != first_seed:
        continue
      gin.clear_config()
      gin_config.parse(p.gin_files, p.gin_params, finalize=False)
      configs[(strip_size(p.variant), size_of(p))] = gin.config_str()
  finally:
    logging.getLogger().removeFilter(sweep_lib.QUIET)
    gin.clear_config()
  base_key = ",".join(base_parts)
  for (variant, size), text in configs.items():
    if variant != base_key and configs.get((base_key, size)) == text:
      raise sweep_lib.SweepError(
        f"sweep {sweep.name}: variant {variant} is the baseline's configuration at ladder size "
        f"{size!r}: the size's bindings override it (bindings apply after .gin files); give the "
        f"variant as bindings, or leave that setting out of the size"
      )
