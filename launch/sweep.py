"""Sweep definitions: a gin file that names a base experiment, axes and seeds.

A sweep file binds `launch.sweep.Sweep` (registered dynamically, like every
other configurable), for example:

  from __gin__ import dynamic_registration
  import launch.sweep

  launch.sweep.Sweep:
    name = 'attention'
    base = ['gin/experiments/tiny_llama.gin']
    params = ['core.train.loop.train.num_steps = 200']
    axes = {
        'attention': {
            'mha': ['core.model.config.ModelConfig.num_kv_heads = 4'],
            'mqa': ['ablations/variants/mqa.gin'],
        },
        'kv': {'binding': 'core.model.config.ModelConfig.num_kv_heads', 'values': [1, 2, 4]},
    }
    seeds = [0, 1]
    baseline = {'attention': 'mha'}

An axis is either named variants (name -> list of bindings and overlay gin
files, applied in order) or one binding with a list of values. The grid is
the product of the axes, in the order written, times the seeds. Every point
is checked (gin parse + finalize, and the ModelConfig built) in this process
before anything trains, so a misspelt binding fails in a second, naming the
axis and the value, instead of after the first child has trained.

`ladder` adds model sizes with a token budget as one more axis, `size`
(launch/ladder.py): every variant x size x seed is a point, and the points'
steps and warmup follow from the budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from core.errors import UserError
from core.paths import REPO_ROOT
from launch import gin_config

SEED_AXIS = "seed"
DEFAULT_SEED_BINDING = "core.train.loop.train.seed"
DATA_SEED_BINDING = "core.train.loop.train.data_seed"


class SweepError(UserError, ValueError):
  """A sweep that cannot run; the message names the axis, value or file at fault."""


@dataclasses.dataclass
class Sweep:
  """What a sweep file binds.

  Attributes:
    name: short name; the MLflow parent run and `ablax compare --sweep NAME` use it.
    base: gin files of the base experiment (later files win).
    axes: ordered mapping axis name -> named variants {variant: [binding or
      overlay .gin file, ...]} or {'binding': 'Name.param', 'values': [...]}.
    seeds: every grid point runs once per seed.
    params: bindings applied to every point after the base files (e.g. fewer
      steps), before the axis bindings.
    baseline: axis -> variant name (or value) of the reference point for
      deltas; an axis left out uses its first entry.
    seed_binding: the binding that receives the seed.
    vary_data_seed: with the trainer's seed binding, a point's seed is its
      init seed and the data order stays that of the first seed for every
      point (train.data_seed), so differences over seeds are initialization
      only; True varies the data order with the seed as well.
    experiment: MLflow experiment; default: the sweep name.
    metric: the metric `ablax compare` ranks by (lower is better).
    ladder: model sizes and a token budget (launch/ladder.py); None = no ladder.
    source: the sweep file it was loaded from (set by `load`, not bound in gin).
  """

  name: str
  base: Sequence[str]
  axes: Mapping[str, Any]
  seeds: Sequence[int] = (0,)
  params: Sequence[str] = ()
  baseline: Mapping[str, Any] | None = None
  seed_binding: str = DEFAULT_SEED_BINDING
  vary_data_seed: bool = False
  experiment: str | None = None
  metric: str = "eval/loss"
  ladder: Mapping[str, Any] | None = None
  source: str | None = dataclasses.field(default=None, repr=False)

  @property
  def experiment_name(self) -> str:
    return self.experiment or self.name


@dataclasses.dataclass(frozen=True)
class Axis:
  name: str
  binding: str | None  # set for value axes
  labels: tuple[str, ...]  # variant names, or str(value)
  entries: tuple[tuple[str, ...], ...]  # per label: bindings and overlay files


@dataclasses.dataclass(frozen=True)
class Point:
  """One child run: a choice per axis and a seed."""

  index: int
  choices: tuple[tuple[str, str], ...]  # (axis, label) in axis order
  seed: int
  gin_files: tuple[str, ...]
  gin_params: tuple[str, ...]

  @property
  def variant(self) -> str:
    """The grid point without the seed: what compare groups seeds by."""
    return ",".join(f"{a}={v}" for a, v in self.choices)

  @property
  def key(self) -> str:
    """Unique within the sweep; names the child's workdir, run and MLflow tag."""
    return slug("__".join(f"{a}-{v}" for a, v in self.choices) + f"__seed-{self.seed}")

  @property
  def params(self) -> dict[str, str]:
    """What the child logs as MLflow params: the axis values under their short names."""
    return {**dict(self.choices), SEED_AXIS: str(self.seed)}


def slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "point"


def literal(value: Any) -> str:
  """A Python value as gin writes it (gin parses Python literals)."""
  return repr(value)


def load(path: str, overrides: Sequence[str] = ()) -> Sweep:
  """Parses a sweep file (plus `launch.sweep.Sweep.x = ...` overrides) into a Sweep; leaves gin clean."""
  import gin

  gin.clear_config()
  try:
    resolved = gin_config.parse([path], overrides, finalize=False)
    try:
      sweep = gin.get_configurable(Sweep)()
    except TypeError as e:
      raise SweepError(f"sweep file {path}: {e} (bind it as launch.sweep.Sweep.<field>)") from None
  except gin_config.GinConfigError as e:
    raise SweepError(f"sweep file {path}: {e}") from None
  finally:
    gin.clear_config()
  sweep.source = str(resolved[0])
  check_shape(sweep)
  return sweep


def check_shape(sweep: Sweep) -> list[Axis]:
  """The sweep's axes, or a SweepError for an empty or malformed grid."""
  if not isinstance(sweep.name, str) or not sweep.name:
    raise SweepError("sweep: name must be a non-empty string")
  if isinstance(sweep.base, str):
    raise SweepError(f"sweep {sweep.name}: base must be a list of gin files, got a string")
  if not sweep.base:
    raise SweepError(f"sweep {sweep.name}: base names no gin file (the experiment to ablate)")
  if not isinstance(sweep.axes, Mapping) or not sweep.axes:
    raise SweepError(f"sweep {sweep.name}: the grid is empty (axes names no axis)")
  if not list(sweep.seeds):
    raise SweepError(f"sweep {sweep.name}: the grid is empty (seeds is an empty list)")
  if len(set(sweep.seeds)) != len(list(sweep.seeds)):
    raise SweepError(f"sweep {sweep.name}: seeds repeat: {list(sweep.seeds)}")
  for seed in sweep.seeds:
    if not isinstance(seed, int) or isinstance(seed, bool):
      raise SweepError(f"sweep {sweep.name}: seeds must be ints, got {seed!r}")
  axes = [parse_axis(sweep.name, name, spec) for name, spec in sweep.axes.items()]
  if SEED_AXIS in sweep.axes:
    raise SweepError(f"sweep {sweep.name}: '{SEED_AXIS}' is reserved; list seeds in `seeds`")
  for name, label in (sweep.baseline or {}).items():
    axis = next((a for a in axes if a.name == name), None)
    if axis is None:
      raise SweepError(
        f"sweep {sweep.name}: baseline names axis {name!r}, which is not one of "
        f"{[a.name for a in axes]}"
      )
    if str(label) not in axis.labels:
      raise SweepError(
        f"sweep {sweep.name}: baseline {name}={label!r} is not one of {list(axis.labels)}"
      )
  if sweep.ladder is not None:
    from launch import ladder  # pylint: disable=g-import-not-at-top

    axes.append(ladder.check_shape(sweep))
  return axes


def parse_axis(sweep_name: str, name: str, spec: Any) -> Axis:
  where = f"sweep {sweep_name}: axis {name!r}"
  # No dots: the trainer logs dotted params ('model.norm', 'core.train...') next to the axis values.
  if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w-]*", name):
    raise SweepError(f"{where}: axis names are short identifiers (letters, digits, _ and -)")
  if not isinstance(spec, Mapping):
    raise SweepError(
      f"{where}: expected {{'binding': ..., 'values': [...]}} or named variants "
      f"{{name: [bindings or .gin files]}}, got {type(spec).__name__}"
    )
  if "binding" in spec or "values" in spec:
    binding, values = spec.get("binding"), spec.get("values")
    if set(spec) != {"binding", "values"} or not isinstance(binding, str):
      raise SweepError(f"{where}: a value axis has exactly 'binding' (a string) and 'values'")
    if not isinstance(values, (list, tuple)) or not values:
      raise SweepError(f"{where}: the grid is empty ('values' is empty)")
    labels = tuple(str(v) for v in values)
    entries = tuple((f"{binding} = {literal(v)}",) for v in values)
  else:
    if not spec:
      raise SweepError(f"{where}: the grid is empty (no variants)")
    labels, entries = [], []
    for label, items in spec.items():
      if isinstance(items, str):
        items = [items]
      if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise SweepError(f"{where}: variant {label!r} must be a list of bindings or .gin files")
      labels.append(str(label))
      entries.append(tuple(items))
    labels, entries, binding = tuple(labels), tuple(entries), None
  if len(set(labels)) != len(labels):
    raise SweepError(f"{where}: values repeat: {list(labels)}")
  return Axis(name, binding, labels, entries)


def split_entries(entries: Sequence[str]) -> tuple[list[str], list[str]]:
  """(overlay .gin files, bindings) of an axis entry list."""
  files = [e for e in entries if e.strip().endswith(".gin") and "=" not in e]
  return files, [e for e in entries if e not in files]


def expand(sweep: Sweep) -> list[Point]:
  """The grid (product of the axes, first axis slowest) times the seeds (fastest).

  With a ladder, its size axis comes last; a size's entries go before the
  variants' (which modify the model the size describes) and its steps and
  warmup after them.
  """
  axes = check_shape(sweep)
  sizes = {}
  if sweep.ladder is not None:
    from launch import ladder  # pylint: disable=g-import-not-at-top

    sizes = {s.label: s for s in ladder.sizes(sweep, axes[:-1])}
  points = []
  combos = itertools.product(*[range(len(a.labels)) for a in axes])
  for combo, seed in itertools.product(list(combos), list(sweep.seeds)):
    files, params = list(sweep.base), list(sweep.params)
    choices = [(axis.name, axis.labels[i]) for axis, i in zip(axes, combo)]
    size = sizes.get(choices[-1][1]) if sizes else None
    if size is not None:
      size_files, size_params = split_entries(size.entries)
      files, params = files + size_files, params + size_params
    for axis, i in zip(axes[:-1] if sizes else axes, combo):
      more_files, more_params = split_entries(axis.entries[i])
      files += more_files
      params += more_params
    if size is not None:
      params += size.bindings
    params.append(f"{sweep.seed_binding} = {seed}")
    if sweep.seed_binding == DEFAULT_SEED_BINDING:
      data_seed = seed if sweep.vary_data_seed else list(sweep.seeds)[0]
      params.append(f"{DATA_SEED_BINDING} = {data_seed}")
    points.append(Point(len(points), tuple(choices), seed, tuple(files), tuple(params)))
  return points


def baseline_variant(sweep: Sweep) -> str:
  """The `Point.variant` string of the baseline (first entry of every axis unless named)."""
  axes = check_shape(sweep)
  chosen = {k: str(v) for k, v in (sweep.baseline or {}).items()}
  return ",".join(f"{a.name}={chosen.get(a.name, a.labels[0])}" for a in axes)


def definition(sweep: Sweep) -> dict[str, Any]:
  """The sweep as JSON-able data (logged to the parent run and hashed)."""
  return {
    "name": sweep.name,
    "base": list(sweep.base),
    "params": list(sweep.params),
    "axes": json.loads(json.dumps(sweep.axes, default=str)),
    "seeds": list(sweep.seeds),
    "baseline": dict(sweep.baseline or {}),
    "seed_binding": sweep.seed_binding,
    "vary_data_seed": sweep.vary_data_seed,
    "experiment": sweep.experiment_name,
    "metric": sweep.metric,
    # Only when set, so the hash of a sweep without a ladder is what it was before ladders.
    **(
      {"ladder": json.loads(json.dumps(sweep.ladder, default=str))}
      if sweep.ladder is not None
      else {}
    ),
  }


def definition_hash(sweep: Sweep) -> str:
  text = json.dumps(definition(sweep), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------- validation


class _DropGinSearchMisses(logging.Filter):
  """gin logs 'Path not found' for every include it looks for in the cwd before its search path."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Path not found")


QUIET = _DropGinSearchMisses()


def _check(files: Sequence[str], params: Sequence[str], where: str) -> None:
  """Parses, finalizes and builds the ModelConfig of one configuration; SweepError if it fails."""
  import gin
  from core.model.config import ModelConfig

  gin.clear_config()
  logging.getLogger().addFilter(QUIET)
  try:
    gin_config.parse(files, params)
    try:
      gin_config.build(ModelConfig, files)
    except gin_config.GinConfigError:
      raise
    except (ValueError, TypeError) as e:
      raise gin_config.GinConfigError(str(e)) from None
  except gin_config.GinConfigError as e:
    raise SweepError(f"{where}: {e}") from None
  finally:
    logging.getLogger().removeFilter(QUIET)
    gin.clear_config()


def validate(sweep: Sweep, points: Sequence[Point] | None = None) -> None:
  """Checks the base, then each axis entry alone on the base, then every point.

  Checking entries one at a time lets the error name the axis and value at
  fault; checking the points catches combinations that are invalid together
  (e.g. 3 kv heads with 4 query heads).
  """
  axes = check_shape(sweep)
  points = expand(sweep) if points is None else points
  base_files, base_params = list(sweep.base), list(sweep.params)
  _check(base_files, base_params, f"sweep {sweep.name}: base {base_files} with params")
  seed0 = f"{sweep.seed_binding} = {sweep.seeds[0]}"
  _check(
    base_files,
    base_params + [seed0],
    f"sweep {sweep.name}: seed_binding {sweep.seed_binding!r} (set it to the trainer's seed "
    f"argument)",
  )
  for axis in axes:
    for label, entries in zip(axis.labels, axis.entries):
      files, params = split_entries(entries)
      _check(
        base_files + files,
        base_params + params,
        f"sweep {sweep.name}: axis {axis.name!r} value {label!r}",
      )
  for point in points:
    _check(
      point.gin_files,
      point.gin_params,
      f"sweep {sweep.name}: point {point.variant} seed {point.seed}",
    )
  if sweep.ladder is not None:
    from launch import ladder  # pylint: disable=g-import-not-at-top

    ladder.check_distinct(sweep, points)


def resolve_files(point: Point) -> list[str]:
  """The point's gin files as absolute paths (children may run from another directory)."""
  return [str(gin_config.resolve_gin_file(f)) for f in point.gin_files]


def relative_to_repo(path: str) -> str:
  try:
    return str(Path(path).resolve().relative_to(REPO_ROOT))
  except ValueError:
    return str(path)
