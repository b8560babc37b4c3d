"""`ablax carbon`: project the energy and carbon of a full-scale training run.

Time comes from `--hours` (wall clock, times `--count`), `--device_hours`, or a
model: `--gin_file`/`--gin_param` give the config, `--tokens` the training
tokens and `--mfu` the assumed utilization; FLOPs per token come from
core.model.flops. Energy is device-hours x power x PUE; carbon is energy x grid
intensity (`--intensity` in kg CO2eq/kWh, or `--region`). Examples:

  # LLaMA-65B as in the LLaMA paper, Table 15 (449 MWh, 173 tCO2eq)
  ablax carbon --device A100 --device_hours 1022362 --pue 1.1 --intensity 0.385
  # a 7B model on 1T tokens at 45% MFU on 512 H100s in europe-west4
  ablax carbon --gin_file gin/models/llama_7b.gin --tokens 1T --mfu 0.45 \\
      --device H100 --count 512 --pue 1.1 --region europe-west4
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from core.tracking import carbon
from launch import gin_config

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str) -> float:
  """'1.4T', '2e12', '300B', '1,000,000' -> float."""
  m = re.fullmatch(
    r"\s*([0-9][0-9_,]*\.?[0-9]*(?:[eE][+-]?[0-9]+)?)\s*([KMBGT]?)\s*",
    str(text),
    flags=re.IGNORECASE,
  )
  if not m:
    raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 1.4T, 2e12, 300B)")
  return float(m.group(1).replace(",", "").replace("_", "")) * _SUFFIX[m.group(2).upper()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.description = __doc__.split("\n\n")[0]
  parser.epilog = (
    "Devices: " + ", ".join(carbon.DEVICES) + ". Regions: " + ", ".join(carbon.REGIONS) + "."
  )
  parser.add_argument(
    "--device",
    required=True,
    help="device kind: a short name (A100, H100, H200, v4, v5e, v5p) or a "
    "JAX device_kind such as 'NVIDIA H100 80GB HBM3'",
  )
  parser.add_argument("--count", type=int, default=1, help="number of devices (default 1)")
  time_group = parser.add_mutually_exclusive_group()
  time_group.add_argument("--hours", type=float, help="wall-clock hours on --count devices")
  time_group.add_argument(
    "--device_hours",
    type=parse_count,
    help="total device-hours (e.g. GPU-hours as papers report them)",
  )
  time_group.add_argument(
    "--tokens", type=parse_count, help="training tokens (with --gin_file and --mfu), e.g. 1.4T"
  )
  gin_config.add_arguments(parser, files_help="model gin file (with --tokens and --mfu)")
  parser.add_argument(
    "--seq_len",
    type=int,
    default=None,
    help="training sequence length for attention FLOPs (default: the config's max_seq_len)",
  )
  parser.add_argument("--mfu", type=float, help="assumed model FLOPs utilization, in (0, 1]")
  parser.add_argument(
    "--peak_tflops", type=float, help="peak dense TFLOPS per device (default: the device table)"
  )
  parser.add_argument(
    "--power_w", type=float, help="power per device in W (required for TPU v5e/v5p/v6e and CPUs)"
  )
  parser.add_argument(
    "--pue", type=float, default=1.0, help="data-centre PUE, >= 1 (default 1.0: device energy only)"
  )
  where = parser.add_mutually_exclusive_group()
  where.add_argument(
    "--intensity", type=float, help="grid carbon intensity in kg CO2eq per kWh (e.g. 0.385)"
  )
  where.add_argument("--region", help="a region of the cited table (see below)")
  parser.add_argument("--json", action="store_true", help="print JSON")


def _model_flops(args: argparse.Namespace) -> dict:
  """FLOPs of training the gin-configured model on --tokens tokens."""
  import gin

  from core.model.config import ModelConfig
  from core.model.flops import flops_per_token, param_counts

  gin.clear_config()
  gin_config.parse_args(args)
  config = gin_config.build(ModelConfig, args.gin_file)
  seq_len = args.seq_len or config.max_seq_len
  per_token = flops_per_token(config, seq_len)
  return {
    "gin_files": [str(f) for f in args.gin_file],
    "seq_len": seq_len,
    "params": param_counts(config),
    "flops_per_token": per_token,
    "tokens": args.tokens,
    "total_flops": per_token * args.tokens,
  }


def project(args: argparse.Namespace) -> dict:
  if args.tokens is not None or args.gin_file:
    if args.tokens is None or not args.gin_file or args.mfu is None:
      raise carbon.CarbonInputError(
        "projecting from a model needs --gin_file, --tokens and --mfu together"
      )
    if args.tokens <= 0:
      raise carbon.CarbonInputError(f"--tokens must be positive, got {args.tokens:g}")
  elif args.hours is None and args.device_hours is None:
    raise carbon.CarbonInputError("give --hours, --device_hours, or --gin_file + --tokens + --mfu")
  if args.mfu is not None and args.tokens is None:
    raise carbon.CarbonInputError("--mfu only applies with --tokens and --gin_file")
  # Check the cheap inputs before building a model.
  carbon.resolve_device(args.device)
  model = _model_flops(args) if args.tokens is not None else None
  result = carbon.project_run(
    args.device,
    count=args.count,
    hours=args.hours,
    device_hours=args.device_hours,
    total_flops=model["total_flops"] if model else None,
    mfu=args.mfu,
    peak_tflops=args.peak_tflops,
    power_w=args.power_w,
    pue=args.pue,
    intensity_kg_per_kwh=args.intensity,
    region=args.region,
  )
  if model:
    result["model"] = model
  return result


def _energy(mwh: float) -> str:
  return f"{mwh:,.2f} MWh" if mwh >= 1 else f"{mwh * 1000:,.3g} kWh"


def _co2(tonnes: float) -> str:
  return f"{tonnes:,.2f} tCO2eq" if tonnes >= 1 else f"{tonnes * 1000:,.3g} kg CO2eq"


def format_text(r: dict) -> str:
  lines = []
  if "model" in r:
    m = r["model"]
    lines += [
      f"model         {', '.join(m['gin_files'])}: {m['params']['total']:,} parameters "
      f"({m['params']['non_embedding']:,} non-embedding)",
      f"compute       {m['tokens']:.4g} tokens x {m['flops_per_token']:.4g} FLOPs/token "
      f"(seq_len {m['seq_len']}) = {m['total_flops']:.4g} FLOPs",
      f"utilization   MFU {r['mfu']:g} of {r['peak_tflops']:g} TFLOPS peak per device",
    ]
  lines += [
    f"devices       {r['count']:,} x {r['device']} for {r['hours']:,.1f} h = "
    f"{r['device_hours']:,.0f} device-hours",
    f"power         {r['power_w']:g} W per device ({r['power_source']})",
    f"energy        {_energy(r['energy_mwh_raw'])} at the devices; {_energy(r['energy_mwh'])} "
    f"with PUE {r['pue']:g}",
  ]
  if r.get("co2_tonnes") is None:
    lines.append("carbon        not computed: give --intensity (kg/kWh) or --region")
  else:
    lines += [
      f"intensity     {r['intensity_kg_per_kwh']:g} kg CO2eq/kWh ({r['intensity_source']})",
      f"carbon        {_co2(r['co2_tonnes'])}",
    ]
  return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
  try:
    result = project(args)
  except ValueError as e:  # CarbonInputError, GinConfigError, ConfigError
    print(f"ablax carbon: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result, indent=2, sort_keys=True))
  else:
    print(format_text(result))
  return 0
