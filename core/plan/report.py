"""From a compiled step to the run: throughput at a stated MFU, wall clock, energy and carbon.

The throughput is an assumption stated in the output (the MFU), not a
measurement: the plan runs nothing. Energy and carbon go through
core.tracking.carbon.project_run with the run's own carbon inputs, so a plan
and a finished run use the same tables and say where each figure comes from.
"""

from __future__ import annotations

from typing import Any

from core.plan.aot import StepPlan
from core.plan.targets import GIB, Target
from core.tracking import carbon


def project(
  plan: StepPlan,
  target: Target,
  *,
  num_steps: int,
  mfu: float,
  pue: float = 1.0,
  grid_region: str | None = None,
  grid_intensity: float | None = None,
  device_power_w: float | None = None,
) -> dict[str, Any]:
  """Tokens/s, wall clock and (where the inputs allow) energy and carbon of the whole run."""
  spec = carbon.resolve_device(target.family.device)
  tokens_per_step = plan.batch * plan.seq
  run_flops = plan.model_flops * num_steps
  # The same arithmetic the carbon projection below uses for its device-hours.
  _, hours = carbon.device_hours_from_flops(run_flops, mfu, spec.peak_tflops, target.num_devices)
  step_s = hours * 3600 / num_steps
  out: dict[str, Any] = {
    "mfu": mfu,
    "peak_tflops_per_device": spec.peak_tflops,
    "peak_source": spec.source,
    "num_steps": num_steps,
    "tokens": tokens_per_step * num_steps,
    "step_s": step_s,
    "tokens_per_s": tokens_per_step / step_s,
    "run_flops": run_flops,
    "hours": hours,
  }
  try:
    run = carbon.project_run(
      target.family.device,
      count=target.num_devices,
      total_flops=run_flops,
      mfu=mfu,
      power_w=device_power_w,
      pue=pue,
      region=grid_region if grid_intensity is None else None,
      intensity_kg_per_kwh=None if grid_intensity is None else grid_intensity / 1000,
    )
  except carbon.CarbonInputError as e:
    # e.g. TPU v5e/v5p: no published chip power; the run needs the user's figure.
    out["energy_error"] = str(e)
    return out
  out.update(
    {
      k: run[k]
      for k in (
        "device_hours",
        "power_w",
        "power_source",
        "pue",
        "energy_mwh_raw",
        "energy_mwh",
        "intensity_kg_per_kwh",
        "intensity_source",
        "co2_tonnes",
      )
    }
  )
  return out


def _gib(n: int | None) -> str:
  return "-" if n is None else f"{n / GIB:8.2f}"


def _count(n: float) -> str:
  for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
    if n >= div:
      return f"{n / div:.3g}{unit}"
  return f"{n:.0f}"


def _energy(mwh: float) -> str:
  return f"{mwh:.3g} MWh" if mwh >= 1 else f"{mwh * 1000:.3g} kWh"


def _mass(tonnes: float) -> str:
  return f"{tonnes:.3g} t" if tonnes >= 1 else f"{tonnes * 1000:.3g} kg"


def _duration(hours: float) -> str:
  if hours < 1 / 60:
    return f"{hours * 3600:.1f} s"
  if hours < 1:
    return f"{hours * 60:.1f} min"
  if hours < 48:
    return f"{hours:.1f} h"
  return f"{hours / 24:.1f} days"


def verdict(plan: StepPlan) -> str:
  """'fits (83% of 16.00 GiB)' or 'does NOT fit: needs 43.15 GiB of 15.75 (27.40 over)'."""
  usable = plan.usable_bytes / GIB
  how = (
    "the compiler's check"
    if plan.verdict_by == "compiler"
    else f"peak vs {usable:.2f} GiB usable: XLA's GPU compiler does not check memory, and the "
    "client takes 75% of HBM by default (XLA_PYTHON_CLIENT_MEM_FRACTION)"
  )
  if plan.fits:
    share = 100 * plan.peak_bytes / plan.usable_bytes
    return f"fits: peak {share:.{0 if share >= 10 else 1}f}% of {usable:.2f} GiB ({how})"
  if plan.used_bytes is not None:
    return (
      f"does NOT fit: needs {plan.used_bytes / GIB:.2f} GiB of {usable:.2f} GiB, "
      f"{plan.overflow_bytes / GIB:.2f} GiB over ({how}: {plan.message})"
    )
  if plan.peak_bytes is not None:
    over = (plan.peak_bytes - plan.usable_bytes) / GIB
    return f"does NOT fit: peak {plan.peak_bytes / GIB:.2f} GiB, {over:.2f} GiB over ({how})"
  return f"does NOT fit ({how}): {plan.message}"


def format_plan(plan: StepPlan, target: Target, run: dict[str, Any], title: str) -> str:
  mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh.items())
  attention = ", ".join(f"{k}={v}" for k, v in plan.attention.items())

  def row(name: str, n: int | None, note: str = "") -> str:
    return f"    {name:<12}{_gib(n)}{note}" if n is not None else f"    {name:<12}       -"

  lines = [
    f"{title} on {target.name} ({target.platform.upper()}, {target.num_devices} devices, "
    f"{target.family.hbm_bytes / GIB:.2f} GiB each; mesh {mesh})",
    f"  batch {plan.batch} x {plan.seq} tokens; attention {attention}",
    f"  compiled in {plan.compile_s:.1f} s here (host peak memory "
    f"{plan.host_peak_bytes / GIB:.2f} GiB)",
    "  per device           GiB",
    row("arguments", plan.argument_bytes, "   (this device's shard of the state and batch)"),
    row("temporaries", plan.temp_bytes),
    row(
      "peak" if plan.peak_bytes is not None else "needed",
      plan.per_device_bytes,
      f"   of {plan.usable_bytes / GIB:.2f} usable",
    ),
    f"  verdict: {verdict(plan)}",
  ]
  if plan.peak_bytes is None:
    lines.append(f"  FLOPs per step: model {plan.model_flops:.3e} (no compiled program to count)")
  elif plan.xla_flops is not None and plan.scan_layers:
    lines.append(
      f"  FLOPs per step: model {plan.model_flops:.3e}; XLA counts a loop's body "
      f"once, so with scan_layers its {plan.xla_flops:.3e} covers one period "
      "(scan_layers=False gives the whole count)"
    )
  elif plan.xla_flops is not None:
    lines.append(
      f"  FLOPs per step: XLA {plan.xla_flops:.3e}, model {plan.model_flops:.3e} "
      f"(XLA / model = {plan.xla_flops / plan.model_flops:.2f})"
    )
  else:
    lines.append(
      f"  FLOPs per step: model {plan.model_flops:.3e} (XLA gives no count on "
      f"{target.platform.upper()})"
    )
  lines.append(
    f"  run: {run['num_steps']} steps, {_count(run['tokens'])} tokens; at an assumed MFU "
    f"of {100 * run['mfu']:.0f}% ({run['peak_tflops_per_device']:g} TFLOP/s peak per device): "
    f"{run['tokens_per_s']:,.0f} tokens/s, {_duration(run['hours'])} wall clock"
  )
  if "energy_error" in run:
    lines.append(
      f"  energy and carbon: not computed: {run['energy_error']} "
      "(ablax plan: --device_power_w W, or train.device_power_w in gin)"
    )
  else:
    energy = (
      f"  energy: {_energy(run['energy_mwh_raw'])} at {run['power_w']:g} W per device"
      f" ({run['device_hours']:.3g} device-hours), {_energy(run['energy_mwh'])} with "
      f"PUE {run['pue']:g}"
    )
    lines.append(energy)
    if run.get("co2_tonnes") is not None:
      lines.append(
        f"  carbon: {_mass(run['co2_tonnes'])} CO2eq at "
        f"{run['intensity_kg_per_kwh']:.3g} kg/kWh ({run['intensity_source']})"
      )
  return "\n".join(lines)
