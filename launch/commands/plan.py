"""`ablax plan`: compile a run's real train step for a TPU slice or GPU node, on this machine.

    ablax plan --gin_file gin/models/gemma2_9b.gin --gin_file gin/train/plan.gin \\
        --target v5e-256 --batch 256 --seq 8192 [--mesh 1,-1,1] [--log]

The gin files are a run's (train's bindings: model, optimizer recipe, mesh,
batch size, steps, carbon inputs); --mesh/--batch/--seq override them. The step
is compiled for compile-only devices of the target (core/plan), nothing is
allocated, and the output says per device whether it fits, with XLA's FLOPs
next to the model's and the run's time, energy and carbon at an assumed MFU.
Exit status: 0 fits, 1 does not fit, 2 bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from core.tracking import schema
from launch import gin_config

TRAIN = "core.train.loop.train"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  gin_config.add_arguments(parser, required=True, files_help="gin file of the run")
  parser.add_argument(
    "--target",
    required=True,
    help="v5e-N, v6e-N (chips), v4-N, v5p-N (TensorCores), a100xN, h100xN, "
    "h200xN (GPUs; 8 per node)",
  )
  parser.add_argument(
    "--mesh",
    default=None,
    help="data,fsdp,tensor sizes, one may be -1 (default: the run's MeshConfig)",
  )
  parser.add_argument(
    "--batch",
    type=int,
    default=None,
    help="global batch rows (default: the run's train.batch_size)",
  )
  parser.add_argument(
    "--seq", type=int, default=None, help="tokens per row (default: the run's lm_batches.seq_len)"
  )
  parser.add_argument(
    "--num_steps",
    type=int,
    default=None,
    help="steps of the run for time/energy (default: train.num_steps)",
  )
  parser.add_argument(
    "--mfu",
    type=float,
    default=0.4,
    help="model FLOPs utilization assumed for tokens/s and time (default 0.4)",
  )
  parser.add_argument(
    "--device_power_w",
    type=float,
    default=None,
    help="watts per device where the table has none (TPU v5e/v5p/v6e)",
  )
  parser.add_argument("--log", action="store_true", help="record the plan as an MLflow run")
  parser.add_argument(
    "--tracking_uri",
    default=None,
    help="MLflow store for --log (default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)",
  )
  parser.add_argument(
    "--experiment",
    default=None,
    help="MLflow experiment for --log (default: the run's experiment + '-plan')",
  )
  parser.add_argument("--json", default=None, help="also write the plan as JSON to this file")


def _mesh(text: str | None, default):
  from core.train import mesh as meshlib  # pylint: disable=g-import-not-at-top

  if text is None:
    return default or meshlib.MeshConfig()
  try:
    sizes = [int(x) for x in text.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) != 3:
    raise meshlib.MeshError(f"--mesh must be three integers data,fsdp,tensor, got {text!r}")
  return meshlib.MeshConfig(*sizes)


def _seq(args, gin) -> int:
  if args.seq is not None:
    return args.seq
  try:
    return int(gin.query_parameter("core.data.pipeline.lm_batches.seq_len"))
  except ValueError:
    raise ValueError("the gin files bind no lm_batches.seq_len; give --seq") from None


def run(args: argparse.Namespace) -> int:
  os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
  # Compile-only devices need no backend of their own; the host stays on CPU.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import gin  # pylint: disable=g-import-not-at-top
  from core.model.config import ConfigError  # pylint: disable=g-import-not-at-top
  from core.plan import aot, report, targets  # pylint: disable=g-import-not-at-top
  from core.tracking.carbon import CarbonInputError  # pylint: disable=g-import-not-at-top
  from core.train import mesh as meshlib, partition  # pylint: disable=g-import-not-at-top
  from core.train.step import make_builder  # pylint: disable=g-import-not-at-top

  try:
    target = targets.parse_target(args.target)
    files = gin_config.parse_args(args, finalize=False)
    # The flags stand in for the run's own values (and for its macros, when nothing sets them).
    for flag, name in ((args.batch, "batch_size"), (args.num_steps, "num_steps")):
      if flag:
        gin.bind_parameter(f"{TRAIN}.{name}", flag)
    try:
      bound = {k: gin_config.resolve_macro(v) for k, v in gin.get_bindings(TRAIN).items()}
    except TypeError as e:  # gin evaluates macros here: one that nothing sets
      macro = re.search(r"in scope '([^']+)'", str(e))
      raise gin_config.GinConfigError(
        f"nothing sets {macro.group(1) if macro else 'a macro of the run'}: bind it "
        "(e.g. --gin.NUM_STEPS=N) or give --batch / --num_steps"
      ) from None
    missing = [k for k in ("model", "optimizer") if k not in bound]
    if missing:
      raise gin_config.GinConfigError(
        f"the gin files bind no train.{missing[0]}: give a run's files (a model, "
        "gin/train/base.gin and an optimizer recipe)"
      )
    batch = args.batch or bound.get("batch_size")
    if not batch:
      raise gin_config.GinConfigError("no batch size: bind train.batch_size or give --batch")
    seq = _seq(args, gin)
    num_steps = args.num_steps or bound.get("num_steps") or 1
    mesh_config = _mesh(args.mesh, bound.get("mesh"))
    mesh_config.shape(target.num_devices)  # a clear error before any compile
    rules = partition.merged_rules(bound.get("rules"))

    def make(mesh):
      return make_builder(
        bound["model"],
        bound["optimizer"],
        mesh,
        rules,
        num_steps=num_steps,
        grad_accum_steps=bound.get("grad_accum_steps", 1),
        z_loss=bound.get("z_loss", 0.0),
        loss_vocab_chunk=bound.get("loss_vocab_chunk", 0),
        step_builder=bound.get("step_builder"),
      )

    print(f"ablax plan: compiling for {target.name} ...", flush=True)
    plan = aot.plan_step(make, target, mesh_config, batch, seq)
    run_figures = report.project(
      plan,
      target,
      num_steps=num_steps,
      mfu=args.mfu,
      pue=bound.get("pue", 1.0),
      grid_region=bound.get("grid_region"),
      grid_intensity=bound.get("grid_intensity"),
      device_power_w=args.device_power_w or bound.get("device_power_w"),
    )
  except (
    gin_config.GinConfigError,
    targets.TargetError,
    meshlib.MeshError,
    ConfigError,
    CarbonInputError,
    ValueError,
  ) as e:
    print(f"ablax plan: {type(e).__name__}: {e}", file=sys.stderr)
    return 2
  title = " + ".join(Path(f).stem for f in files)
  config = bound["model"]
  title += f" (scan_layers={config.scan_layers}, remat={config.remat})"
  print(report.format_plan(plan, target, run_figures, title), flush=True)
  record = {
    "plan": dataclasses.asdict(plan),
    "run": run_figures,
    "gin_files": [str(f) for f in files],
    "gin_params": list(args.gin_param),
    "model": config.to_dict(),
  }
  if args.json:
    Path(args.json).write_text(json.dumps(record, indent=2, default=str))
  if args.log:
    try:
      run_id, uri = _log(record, args, bound.get("experiment") or "ablax")
    except Exception as e:  # noqa: BLE001  the plan is printed; a store failure is reported
      print(
        f"ablax plan: could not record the plan in MLflow: {type(e).__name__}: {e}", file=sys.stderr
      )
      return 2
    print(f"  recorded as MLflow run {run_id} in {uri}")
  return 0 if plan.fits else 1


def _log(record: dict, args: argparse.Namespace, experiment: str) -> tuple[str, str]:
  """One MLflow run holding the plan: inputs as params, figures as metrics, the whole as JSON."""
  from analysis import runs as runs_lib  # pylint: disable=g-import-not-at-top
  from core.tracking.record import flatten_params  # pylint: disable=g-import-not-at-top
  from core.tracking.store import ensure_experiment  # pylint: disable=g-import-not-at-top
  from mlflow.entities import Metric, Param, RunTag  # pylint: disable=g-import-not-at-top

  uri = args.tracking_uri or runs_lib.default_tracking_uri()
  client = runs_lib.client(uri)
  name = args.experiment or f"{experiment}-plan"
  experiment_id = ensure_experiment(client, uri, name)
  plan, run = record["plan"], record["run"]
  run_obj = client.create_run(
    experiment_id,
    run_name=f"plan {plan['target']}",
    tags={
      schema.KIND: "plan",
      schema.PLAN_TARGET: plan["target"],
      schema.PLAN_FITS: str(plan["fits"]),
    },
  )
  run_id = run_obj.info.run_id
  params = {
    "target": plan["target"],
    "batch": plan["batch"],
    "seq": plan["seq"],
    "mfu_assumed": run["mfu"],
    "gin_files": ",".join(record["gin_files"]),
    **{f"mesh.{k}": v for k, v in plan["mesh"].items()},
    **{f"attention.impl.{k}": v for k, v in plan["attention"].items()},
    **flatten_params(record["model"], prefix="model."),
  }
  numbers = {
    k: plan[k]
    for k in (
      "argument_bytes",
      "temp_bytes",
      "peak_bytes",
      "used_bytes",
      "usable_bytes",
      "xla_flops",
      "model_flops",
      "compile_s",
      "host_peak_bytes",
    )
  }
  numbers.update(
    {
      k: run[k]
      for k in ("tokens_per_s", "hours", "run_flops", "energy_mwh", "co2_tonnes")
      if run.get(k) is not None
    }
  )
  numbers["fits"] = float(plan["fits"])
  now = int(time.time() * 1000)
  client.log_batch(
    run_id,
    params=[Param(k, str(v)[:6000]) for k, v in params.items()],
    metrics=[Metric(f"plan/{k}", float(v), now, 0) for k, v in numbers.items() if v is not None],
    tags=[RunTag(schema.NOTE, "ablax plan: " + " ".join(sys.argv[1:]))],
  )
  with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "plan.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    client.log_artifact(run_id, str(path))
  client.set_terminated(run_id, "FINISHED")
  return run_id, uri
