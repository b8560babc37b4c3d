"""`ablax sweep`: run an ablation sweep (grid x seeds) under one MLflow parent run.

  ablax sweep ablations/attention.gin                  # run (or resume) every point
  ablax sweep ablations/attention.gin --dry-run        # list and check the points, run nothing
  ablax sweep ablations/attention.gin --workers 2 --gin_param 'launch.sweep.Sweep.seeds = [0, 1, 2]'
  ablax sweep ablations/attention.gin --launcher slurm  # a job array (launch/slurm_sweep.py)
  ablax sweep ablations/attention.gin --status         # each point's MLflow (and SLURM) state
  ablax sweep ablations/ladder_activation.gin --dry-run  # a size ladder: params, tokens, FLOPs, CPU time

A re-run with the same sweep definition and workdir skips the points whose
MLflow run finished, leaves alone those another process is training (their
workdir lock is held), and resumes the others from their checkpoints. At the end
the comparison table is printed and logged, with the command that opens the
MLflow UI on the store.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from analysis import runs as runs_lib
from launch import gin_config
from launch import slurm
from launch import sweep as sweep_lib
from launch import sweep_runner
from launch import sweep_view


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("sweep_file", help="sweep gin file, e.g. ablations/attention.gin")
  parser.add_argument(
    "--gin_bindings",
    "--gin_param",
    dest="gin_param",
    action="append",
    default=[],
    metavar="BINDING",
    help="override a sweep field, e.g. 'launch.sweep.Sweep.seeds = [0]' (repeatable)",
  )
  parser.add_argument(
    "--gin_search_paths",
    action="append",
    default=[],
    metavar="DIRS",
    help="folders (comma-separated) searched for gin files and includes, by "
    "the sweep and every point it runs",
  )
  parser.add_argument(
    "--workdir",
    default=None,
    help="where the children's workdirs and logs go (default: runs/<sweep name>)",
  )
  parser.add_argument(
    "--tracking_uri",
    default=None,
    help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/runs/mlflow.db)",
  )
  parser.add_argument(
    "--workers",
    type=int,
    default=0,
    help="children run at once (default: one per GPU, else one per core, at most 8)",
  )
  parser.add_argument(
    "--dry-run",
    "--dry_run",
    dest="dry_run",
    action="store_true",
    help="list and validate the points; train nothing, log nothing",
  )
  parser.add_argument("--fail_fast", action="store_true", help="stop after the first failed point")
  parser.add_argument("--no_compare", action="store_true", help="skip the table at the end")
  parser.add_argument("--train_command", default=None, help=argparse.SUPPRESS)
  parser.add_argument(
    "--launcher",
    choices=("local", "slurm"),
    default="local",
    help="run the points here, or submit them as a SLURM job array",
  )
  parser.add_argument(
    "--status", action="store_true", help="show each point's SLURM task and MLflow run, then exit"
  )
  slurm.add_arguments(parser)


def default_workers(n_points: int) -> int:
  gpus = sweep_runner.visible_gpus()
  per_machine = len(gpus) if gpus else min(8, len(sweep_runner.available_cpus()))
  return max(1, min(n_points, per_machine))


def print_points(sweep: sweep_lib.Sweep, points: list[sweep_lib.Point]) -> None:
  axes = sweep_lib.check_shape(sweep)
  print(
    f"sweep {sweep.name}: {len(points)} points = "
    + " x ".join(f"{a.name} ({len(a.labels)})" for a in axes)
    + f" x seeds {list(sweep.seeds)}; baseline {sweep_lib.baseline_variant(sweep)}"
  )
  width = max(len(p.variant) for p in points)
  for p in points:
    extra = [x for x in p.gin_params[len(sweep.params) : -1]]
    overlays = list(p.gin_files[len(sweep.base) :])
    detail = "; ".join(extra + overlays)
    print(f"  {p.index:3d}  {p.variant.ljust(width)}  seed={p.seed}  {detail}")


def run(args: argparse.Namespace) -> int:
  started = time.monotonic()
  # Bad input (core.errors.UserError) is reported by launch/cli.py as one line, exit 2.
  gin_config.add_search_paths(args.gin_search_paths)
  sweep = sweep_lib.load(args.sweep_file, args.gin_param)
  points = sweep_lib.expand(sweep)
  print_points(sweep, points)
  sweep_lib.validate(sweep, points)
  if sweep.ladder is not None:
    from launch import ladder  # pylint: disable=g-import-not-at-top

    ladder.print_ladder(
      sweep,
      points,
      args.workers or default_workers(len(points)),
      len(sweep_runner.available_cpus()),
    )
  print(f"all {len(points)} points parse, finalize and build")
  if args.launcher == "slurm" or args.status:
    from launch import slurm_sweep  # pylint: disable=g-import-not-at-top

    return slurm_sweep.sweep_main(args, sweep, points)
  if args.dry_run:
    return 0

  tracking_uri = args.tracking_uri or runs_lib.default_tracking_uri()
  workdir = Path(args.workdir or Path("runs") / sweep.name).resolve()
  parent_id = sweep_runner.open_parent(sweep, points, tracking_uri, workdir)
  done = sweep_runner.finished_points(tracking_uri, parent_id)
  # A point another process is training is neither finished nor resumable here.
  running = sweep_runner.running_points([p for p in points if p.key not in done], workdir)
  todo = [p for p in points if p.key not in done and p.key not in running]
  workers = args.workers or default_workers(len(todo))
  print(
    f"parent run {parent_id} in {tracking_uri} (experiment {sweep.experiment_name}); "
    f"{len(done)} finished before, "
    + (f"{len(running)} running elsewhere, " if running else "")
    + f"{len(todo)} to run with {workers} worker(s); logs in {workdir / 'logs'}"
  )
  for key, info in running.items():
    print(
      f"  {key}: being trained by pid {info.get('pid')} on {info.get('host')}; not started again",
      flush=True,
    )
  prefix = args.train_command.split() if args.train_command else sweep_runner.TRAIN_COMMAND
  run_ids = {
    p.key: sweep_runner.prepare_child(
      sweep, p, workdir=workdir, tracking_uri=tracking_uri, parent_run_id=parent_id
    )
    for p in todo
  }
  commands = {
    p.key: sweep_runner.child_command(
      p, sweep, workdir=workdir, tracking_uri=tracking_uri, prefix=prefix
    )
    for p in todo
  }

  view = sweep_view.SweepView(len(todo))

  def on_start(p: sweep_lib.Point, env: dict, cpus: list) -> None:
    sweep_runner.record_env(tracking_uri, run_ids[p.key], env, cpus)
    view.started(p.key, f"{p.variant} seed={p.seed}", workdir / "logs" / f"{p.key}.log")

  def on_done(outcome: sweep_runner.Outcome, n_done: int, total: int) -> None:
    p = outcome.point
    view.finished(p.key)
    status = (
      "done"
      if outcome.status == "FINISHED"
      else (f"{outcome.status} (exit {outcome.returncode}, log {outcome.log})")
    )
    print(
      f"[{n_done}/{total}] {p.variant} seed={p.seed}: {status} in {outcome.seconds:.0f} s",
      flush=True,
    )

  cpu_peak = sweep_runner.machine_cpu_peak() if todo else None
  if cpu_peak:
    print(
      f"CPU peak {cpu_peak / 1e9:.0f} GFLOP/s (float32 matmul, measured once; each worker's "
      "MFU divides by its share of it)",
      flush=True,
    )
    sweep_runner.client(tracking_uri).log_metric(parent_id, "sweep/cpu_peak_flops", cpu_peak)

  # SIGTERM (a scheduler, `kill`) stops the children the way Ctrl-C does, so they checkpoint.
  previous = signal.signal(signal.SIGTERM, _raise_interrupt)
  try:
    outcomes = sweep_runner.run_points(
      todo,
      commands,
      workers=workers,
      log_dir=workdir / "logs",
      on_done=on_done,
      fail_fast=args.fail_fast,
      settle=lambda p, rc: sweep_runner.settle_child(tracking_uri, run_ids[p.key], rc),
      on_start=on_start,
      cpu_peak=cpu_peak,
    )
  except KeyboardInterrupt:
    sweep_runner.close_parent(tracking_uri, parent_id, "KILLED")
    print("\nablax sweep: interrupted; run the same command again to resume", file=sys.stderr)
    return 130
  finally:
    view.stop()
    signal.signal(signal.SIGTERM, previous)
  failed = [o for o in outcomes if o.status != "FINISHED"]
  sweep_runner.close_parent(
    tracking_uri, parent_id, "FAILED" if failed else ("KILLED" if running else "FINISHED")
  )  # KILLED: a rerun after those end completes it

  if not args.no_compare and sweep.ladder is not None:
    _print_scaling(tracking_uri, parent_id, workdir / "scaling")
  elif not args.no_compare:
    _print_comparison(tracking_uri, parent_id, workdir / "comparison")
  minutes = (time.monotonic() - started) / 60
  print(
    f"\nsweep {sweep.name}: {len(points) - len(failed) - len(running)}/{len(points)} points "
    f"finished ({minutes:.1f} min). Parent run {parent_id}."
  )
  if running:
    print(
      f"{len(running)} point(s) were being trained by other processes; run the same command "
      "again once they end"
    )
  if failed:
    print("failed points (their logs say why; re-run the same command to retry them):")
    for o in failed:
      print(f"  {o.point.variant} seed={o.point.seed}: {o.log}")
  print(
    f"Compare again:  ablax compare --sweep {sweep.name}"
    + (" --scaling" if sweep.ladder is not None else "")
    + (
      ""
      if args.tracking_uri is None and "MLFLOW_TRACKING_URI" not in os.environ
      else f" --tracking_uri {tracking_uri}"
    )
  )
  print(f"Open the UI:    {runs_lib.ui_command(tracking_uri)}")
  return 1 if failed or running else 0


def _raise_interrupt(signum, frame):
  raise KeyboardInterrupt


def _print_comparison(tracking_uri: str, parent_id: str, plots_dir: Path) -> None:
  from analysis import compare as compare_lib  # pylint: disable=g-import-not-at-top
  from analysis import table as table_lib  # pylint: disable=g-import-not-at-top

  c = runs_lib.client(tracking_uri)
  try:
    comparison = compare_lib.compare(c, sweep=parent_id)
  except (runs_lib.RunLookupError, ValueError) as e:
    print(f"no comparison: {e}", file=sys.stderr)
    return
  print()
  print(table_lib.render(comparison.table, "text"))
  try:
    paths = compare_lib.save_plots(c, comparison, plots_dir)
    print(
      f"plots (also logged to the parent run): "
      f"{', '.join(str(p) for p in paths if p.suffix == '.png')}"
    )
  except Exception as e:  # noqa: BLE001  plots are a courtesy; the table is printed
    print(f"plots not written: {type(e).__name__}: {e}", file=sys.stderr)


def _print_scaling(tracking_uri: str, parent_id: str, out_dir: Path) -> None:
  from analysis import ladder  # pylint: disable=g-import-not-at-top
  from analysis import scaling  # pylint: disable=g-import-not-at-top

  c = runs_lib.client(tracking_uri)
  try:
    result = ladder.collect(c, parent_id)
  except (runs_lib.RunLookupError, scaling.ScalingError) as e:
    print(f"no scaling fit: {e}", file=sys.stderr)
    return
  print()
  print(ladder.render(result, "text"))
  paths = ladder.save(c, result, out_dir)
  print(f"plot (also logged to the parent run): {paths[0]}")
