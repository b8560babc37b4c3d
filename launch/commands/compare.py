"""`ablax compare`: a sweep's variants side by side, from MLflow.

ablax compare --sweep attention                      # by sweep name (newest) or parent run id
ablax compare --sweep attention --format latex
ablax compare --experiment tiny --filter "params.seed = '0'" --group_by ModelConfig.num_kv_heads
ablax compare --sweep ladder_activation --scaling --at_flops 1e21   # a ladder: scaling fits
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from analysis import compare as compare_lib
from analysis import axes as axes_lib
from analysis import runs as runs_lib
from analysis import table as table_lib


def add_arguments(parser: argparse.ArgumentParser) -> None:
  what = parser.add_mutually_exclusive_group()
  what.add_argument("--sweep", help="sweep name (its newest parent run) or parent run id")
  what.add_argument(
    "--experiment",
    default=os.environ.get("MLFLOW_EXPERIMENT_NAME"),
    help="compare the finished runs of this MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME)",
  )
  parser.add_argument("--filter", default="", help="MLflow filter string (with --experiment)")
  parser.add_argument(
    "--group_by",
    action="append",
    default=[],
    help="param whose value defines a variant (repeatable; default: the sweep "
    "variant, else the run name)",
  )
  parser.add_argument(
    "--tracking_uri",
    default=None,
    help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)",
  )
  parser.add_argument(
    "--metric", default=None, help="final metric to compare (default: the sweep's, else eval/loss)"
  )
  parser.add_argument("--baseline", default=None, help="baseline variant for deltas")
  parser.add_argument("--confidence", type=float, default=0.95, help="CI level (default 0.95)")
  parser.add_argument(
    "--x",
    choices=("step", "tokens", "flops", "time"),
    default="step",
    help="x axis of the loss curves (tokens and FLOPs on a log axis)",
  )
  parser.add_argument(
    "--at",
    default=None,
    help="compare at equal compute instead of at the end: tokens=N or flops=F "
    "(or step=S), each run's curve interpolated there",
  )
  parser.add_argument(
    "--scaling",
    action="store_true",
    help="a ladder sweep: fit L(C) = E + A C^-alpha per variant, with bootstrap "
    "CIs, Δ per size, sign stability, Δ and compute multiplier at --at_flops",
  )
  parser.add_argument(
    "--at_flops",
    type=float,
    default=None,
    help="with --scaling: the target training compute (default 1e21)",
  )
  parser.add_argument(
    "--n_boot", type=int, default=1000, help="with --scaling: bootstrap replicates (default 1000)"
  )
  parser.add_argument(
    "--format",
    choices=sorted(table_lib.FORMATS),
    default="text",
    help="table format: text (terminal), markdown, latex (paper) or csv",
  )
  parser.add_argument("--output", default=None, help="also write the table to this file")
  parser.add_argument(
    "--plots_dir", default=None, help="where to save the PNG plots (default: a temporary directory)"
  )
  parser.add_argument("--no_plots", action="store_true", help="skip plots")
  parser.add_argument(
    "--no_log", action="store_true", help="do not log the plots and table to the sweep's parent run"
  )


def run(args: argparse.Namespace) -> int:
  if not 0.0 < args.confidence < 1.0:
    print("ablax compare: --confidence must be in (0, 1)", file=sys.stderr)
    return 2
  if not (args.sweep or args.experiment):
    print(
      "ablax compare: give --sweep NAME or --experiment NAME (or set MLFLOW_EXPERIMENT_NAME)",
      file=sys.stderr,
    )
    return 2
  if args.sweep:
    args.experiment = None  # the environment's default yields to an explicit sweep
  tracking_uri = args.tracking_uri or runs_lib.default_tracking_uri()
  c = runs_lib.client(tracking_uri)
  if args.scaling:
    return run_scaling(args, c, tracking_uri)
  if args.at_flops is not None:
    print(
      "ablax compare: --at_flops goes with --scaling (for the table use --at flops=F)",
      file=sys.stderr,
    )
    return 2
  try:
    comparison = compare_lib.compare(
      c,
      sweep=args.sweep,
      experiment=args.experiment,
      filter_string=args.filter,
      group_by=args.group_by,
      metric=args.metric,
      baseline=args.baseline,
      confidence=args.confidence,
      at=axes_lib.parse_at(args.at),
    )
  except (runs_lib.RunLookupError, ValueError) as e:
    print(f"ablax compare: {e}", file=sys.stderr)
    return 2
  text = table_lib.render(comparison.table, args.format)
  print(text)
  if args.output:
    Path(args.output).write_text(text)
  if not args.no_plots:
    paths = compare_lib.save_plots(
      c, comparison, args.plots_dir, log_to_parent=not args.no_log, axis=args.x
    )
    pngs = [str(p) for p in paths if p.suffix == ".png"]
    logged = (
      f" and logged to run {comparison.parent.info.run_id}"
      if comparison.parent is not None and not args.no_log
      else ""
    )
    print(f"plots: {', '.join(pngs)}{logged}", file=sys.stderr)
  print(f"MLflow UI: {runs_lib.ui_command(tracking_uri)}", file=sys.stderr)
  return 0


def run_scaling(args: argparse.Namespace, c, tracking_uri: str) -> int:
  from analysis import ladder  # pylint: disable=g-import-not-at-top
  from analysis import scaling  # pylint: disable=g-import-not-at-top

  at_flops = ladder.DEFAULT_AT_FLOPS if args.at_flops is None else args.at_flops
  if not args.sweep:
    print("ablax compare: --scaling fits a ladder sweep; give --sweep NAME", file=sys.stderr)
    return 2
  if not at_flops > 0 or args.n_boot < 10:
    print("ablax compare: --at_flops must be positive and --n_boot at least 10", file=sys.stderr)
    return 2
  try:
    result = ladder.collect(
      c,
      args.sweep,
      metric=args.metric,
      baseline=args.baseline,
      at_flops=at_flops,
      confidence=args.confidence,
      n_boot=args.n_boot,
    )
  except (runs_lib.RunLookupError, scaling.ScalingError) as e:
    print(f"ablax compare: {e}", file=sys.stderr)
    return 2
  text = ladder.render(result, args.format)
  print(text)
  if args.output:
    Path(args.output).write_text(text)
  if not args.no_plots:
    paths = ladder.save(c, result, args.plots_dir, log_to_parent=not args.no_log)
    logged = f" and logged to run {result.parent.info.run_id}" if not args.no_log else ""
    print(f"plot: {paths[0]}{logged}", file=sys.stderr)
  elif not args.no_log:
    ladder.log_result(c, result)
  print(f"MLflow UI: {runs_lib.ui_command(tracking_uri)}", file=sys.stderr)
  return 0
