"""Energy and carbon arithmetic, and the cited tables it reads.

Everything here is a pure function of its inputs: no device access, no network.
The convention is the one of the LLaMA paper (Touvron et al. 2023a, Table 15,
following Wu et al. 2022):

  Wh      = device-hours x device power (W) x PUE
  tCO2eq  = MWh x grid intensity (kg CO2eq / kWh)

Raw energy (device power only) and PUE-scaled energy (the facility's share
included) are always reported apart, so a reader can tell which one a figure is.

Published tables this reproduces (tests/test_carbon_tables.py):
  - LLaMA (arXiv:2302.13971) Table 15: A100 at 400 W, PUE 1.1, 0.385 kg/kWh.
    Its MWh column is truncated (65B: 449.84 -> 449) and its tCO2eq column
    rounded (7B: 13.96 -> 14), both from the unrounded energy; the BLOOM row's
    475 MWh does not follow the formula (476.47) although its 183 t does.
  - Llama 2 (arXiv:2307.09288) Table 2: the power column (400 W / 350 W) is
    the raw GPU cap; the tCO2eq follow the LLaMA convention, PUE 1.1 x 0.385
    kg/kWh = 0.4235 kg per device-kWh, truncated to two decimals (rounding
    would give 62.45 and 153.91 for 13B and 34B where the table has 62.44 and
    153.90); the 539.00 total is the unrounded sum.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from core.errors import UserError

# --------------------------------------------------------------------------
# Device table
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """Published power and peak throughput of one accelerator kind.

  Attributes:
    name: canonical key, e.g. 'a100-sxm'.
    power_w: board/chip power used for estimates (TDP or published maximum);
      None where the vendor publishes no figure (the user must supply one).
    peak_tflops: dense bf16 peak per device (for projecting hours from FLOPs,
      and MFU); None where not published.
    source: where the figures come from.
    fp32_tflops: dense float32 peak (plain FP32, not TF32) for MFU of float32
      runs; on TPUs, which run float32 matmuls as bf16 passes, half the bf16 peak.
  """

  name: str
  power_w: float | None
  peak_tflops: float | None
  source: str
  fp32_tflops: float | None = None


# Power is the figure the carbon literature uses (TDP / maximum board power),
# not a measured average, so projections match published tables.
DEVICES: dict[str, DeviceSpec] = {
  s.name: s
  for s in (
    DeviceSpec(
      "a100-sxm",
      400.0,
      312.0,
      "NVIDIA A100 Tensor Core GPU datasheet (SXM4 40/80GB: max TDP 400 W; "
      "BF16 dense 312 TFLOPS); LLaMA paper Table 15 uses the same 400 W",
      fp32_tflops=19.5,
    ),
    DeviceSpec(
      "a100-pcie-40gb",
      250.0,
      312.0,
      "NVIDIA A100 datasheet (PCIe 40GB: max TDP 250 W)",
      fp32_tflops=19.5,
    ),
    DeviceSpec(
      "a100-pcie-80gb",
      300.0,
      312.0,
      "NVIDIA A100 datasheet (PCIe 80GB: max TDP 300 W)",
      fp32_tflops=19.5,
    ),
    DeviceSpec(
      "h100-sxm",
      700.0,
      989.0,
      "NVIDIA H100 Tensor Core GPU datasheet (SXM: max TDP up to 700 W; "
      "BF16 dense 989 TFLOPS, half the sparse 1,979)",
      fp32_tflops=67.0,
    ),
    DeviceSpec(
      "h100-pcie",
      350.0,
      756.0,
      "NVIDIA H100 datasheet (PCIe: max TDP 300-350 W, upper value; BF16 dense 756)",
      fp32_tflops=51.0,
    ),
    DeviceSpec(
      "h100-nvl",
      400.0,
      835.0,
      "NVIDIA H100 datasheet (NVL: max TDP 350-400 W, upper value; BF16 dense 835)",
      fp32_tflops=60.0,
    ),
    DeviceSpec(
      "h200-sxm",
      700.0,
      989.0,
      "NVIDIA H200 Tensor Core GPU datasheet (SXM: max TDP up to 700 W; BF16 dense 989 TFLOPS)",
      fp32_tflops=67.0,
    ),
    DeviceSpec(
      "h200-nvl",
      600.0,
      835.0,
      "NVIDIA H200 datasheet (NVL: max TDP up to 600 W; BF16 dense 835)",
      fp32_tflops=60.0,
    ),
    DeviceSpec(
      "v100-sxm2",
      300.0,
      125.0,
      "NVIDIA V100 datasheet (SXM2: 300 W; 125 TFLOPS tensor)",
      fp32_tflops=15.7,
    ),
    DeviceSpec(
      "tpu-v4",
      192.0,
      275.0,
      "Jouppi et al. 2023, 'TPU v4: An Optically Reconfigurable Supercomputer', "
      "ISCA, Table 2 (chip max 192 W, mean 170 W) and Google Cloud TPU v4 "
      "documentation (275 TFLOPS bf16)",
      fp32_tflops=137.5,
    ),
    DeviceSpec(
      "tpu-v5e",
      None,
      197.0,
      "Google Cloud TPU v5e documentation (197 TFLOPS bf16); Google publishes "
      "no chip power for v5e, so the user supplies one",
      fp32_tflops=98.5,
    ),
    DeviceSpec(
      "tpu-v5p",
      None,
      459.0,
      "Google Cloud TPU v5p documentation (459 TFLOPS bf16); Google publishes "
      "no chip power for v5p, so the user supplies one",
      fp32_tflops=229.5,
    ),
    DeviceSpec(
      "tpu-v6e",
      None,
      918.0,
      "Google Cloud TPU v6e (Trillium) documentation (918 TFLOPS bf16); no chip "
      "power published, so the user supplies one",
      fp32_tflops=459.0,
    ),
    DeviceSpec(
      "l4",
      72.0,
      121.0,
      "NVIDIA L4 datasheet (72 W; BF16 dense 121 TFLOPS, FP32 30.3)",
      fp32_tflops=30.3,
    ),
    # A CPU's power depends on the model; core/tracking/energy.py estimates it
    # from the machine (RAPL power limit, else a per-core default).
    DeviceSpec("cpu", None, None, "host CPU: see core.tracking.energy.cpu_power_w"),
  )
}

# (pattern on the lower-cased name, canonical key); first match wins. Covers
# JAX `device_kind` strings ('NVIDIA A100-SXM4-80GB', 'TPU v5 lite', ...) and
# the short names people type ('A100', 'v5e').
_DEVICE_PATTERNS: tuple[tuple[str, str], ...] = (
  (r"a100.*(pcie|pci-e).*80|a100.*80gb.*pcie", "a100-pcie-80gb"),
  (r"a100.*(pcie|pci-e)", "a100-pcie-40gb"),
  (r"a100", "a100-sxm"),
  (r"h100.*nvl", "h100-nvl"),
  (r"h100.*(pcie|pci-e)", "h100-pcie"),
  (r"h100", "h100-sxm"),
  (r"h200.*nvl", "h200-nvl"),
  (r"h200", "h200-sxm"),
  (r"v100", "v100-sxm2"),
  (r"\bl4\b", "l4"),
  (r"^(tpu[ _-]?)?v4$", "tpu-v4"),
  (r"^(tpu[ _-]?)?v5[ _-]?(lite|e)$", "tpu-v5e"),
  (r"^(tpu[ _-]?)?v5[ _-]?p?$", "tpu-v5p"),
  (r"^(tpu[ _-]?)?v6[ _-]?(lite|e)$", "tpu-v6e"),
  (r"^(cpu|host)$", "cpu"),
)


class CarbonInputError(UserError, ValueError):
  """An unknown device or region, or a value out of range; the message says which."""


def resolve_device(device: str) -> DeviceSpec:
  """The table entry for a JAX device_kind or a short name, or a clear error."""
  key = str(device).strip().lower()
  if key in DEVICES:
    return DEVICES[key]
  # Grace superchips (GH200/GB200) contain 'h200'/'b200' but are CPU+GPU
  # modules with their own power envelope: not the H200 row.
  superchip = re.search(r"\bg[hb]\d00\b", key) is not None
  for pattern, name in () if superchip else _DEVICE_PATTERNS:
    if re.search(pattern, key):
      return DEVICES[name]
  raise CarbonInputError(
    f"unknown device {device!r}; known: {', '.join(DEVICES)} (or a JAX device_kind such "
    f"as 'NVIDIA A100-SXM4-80GB', 'TPU v5 lite'); for other hardware pass its power "
    f"with --power_w / power_w= and name the closest known device"
  )


def device_power_w(device: str, power_w: float | None = None) -> tuple[float, str]:
  """(watts per device, where the figure comes from); a user value wins."""
  spec = resolve_device(device)
  if power_w is not None:
    _check_positive("power_w", power_w)
    return float(power_w), f"user-supplied ({power_w:g} W per device)"
  if spec.power_w is None:
    raise CarbonInputError(
      f"no published power figure for {spec.name} ({spec.source}); supply one per "
      f"device with --power_w / power_w="
    )
  return spec.power_w, spec.source


# --------------------------------------------------------------------------
# Grid carbon intensity
# --------------------------------------------------------------------------

# Sources of the region table.
_GOOGLE_2023 = (
  "Google Cloud region carbon data, 2023 grid carbon intensity "
  "(github.com/GoogleCloudPlatform/region-carbon-info, data/yearly/2023.csv)"
)
_EMBER_WORLD = (
  "Ember, Global Electricity Review 2023: world average carbon intensity of "
  "electricity generation in 2022, 436 g CO2/kWh"
)
_LLAMA_US = (
  "Touvron et al. 2023a (LLaMA), Table 15: national US average 0.385 kg CO2e/kWh, "
  "after Wu et al. 2022"
)

# region -> (g CO2eq / kWh, source). Location-based grid averages; a
# market-based figure (renewable purchases) is a user value, not a region.
REGIONS: dict[str, tuple[float, str]] = {
  "us-average-llama": (385.0, _LLAMA_US),
  # The default of gin/train/base.gin when the machine's grid is unknown.
  "world-2022": (436.0, _EMBER_WORLD),
  **{
    region: (float(g), _GOOGLE_2023)
    for region, g in (
      ("africa-south1", 646),
      ("asia-east1", 451),
      ("asia-east2", 360),
      ("asia-northeast1", 459),
      ("asia-northeast2", 385),
      ("asia-northeast3", 378),
      ("asia-south1", 648),
      ("asia-south2", 529),
      ("asia-southeast1", 369),
      ("asia-southeast2", 580),
      ("australia-southeast1", 501),
      ("australia-southeast2", 456),
      ("europe-central2", 723),
      ("europe-north1", 46),
      ("europe-southwest1", 131),
      ("europe-west1", 122),
      ("europe-west2", 136),
      ("europe-west3", 345),
      ("europe-west4", 236),
      ("europe-west6", 59),
      ("europe-west8", 249),
      ("europe-west9", 34),
      ("europe-west10", 345),
      ("europe-west12", 249),
      ("me-central1", 575),
      ("me-central2", 569),
      ("me-west1", 463),
      ("northamerica-northeast1", 2),
      ("northamerica-northeast2", 47),
      ("southamerica-east1", 56),
      ("southamerica-west1", 138),
      ("us-central1", 430),
      ("us-east1", 560),
      ("us-east4", 322),
      ("us-east5", 322),
      ("us-south1", 321),
      ("us-west1", 94),
      ("us-west2", 198),
      ("us-west3", 588),
      ("us-west4", 373),
    )
  },
}

# The highest national grid averages are around 1 kg/kWh; anything far above
# is almost certainly g/kWh typed where kg/kWh was meant (or the reverse).
_MAX_KG_PER_KWH = 2.0


def grid_intensity(
  region: str | None = None, intensity_g_per_kwh: float | None = None
) -> tuple[float, str]:
  """(g CO2eq per kWh, source) from a user value or the region table."""
  if intensity_g_per_kwh is not None and region is not None:
    raise CarbonInputError("give a grid intensity or a region, not both")
  if intensity_g_per_kwh is not None:
    _check_nonnegative("intensity", intensity_g_per_kwh)
    if intensity_g_per_kwh > 1000 * _MAX_KG_PER_KWH:
      raise CarbonInputError(
        f"grid intensity {intensity_g_per_kwh:g} g/kWh is above any real grid "
        f"(~1000 g/kWh at most); check the unit"
      )
    return float(intensity_g_per_kwh), f"user-supplied ({intensity_g_per_kwh:g} g/kWh)"
  if region is None:
    raise CarbonInputError("give a grid intensity or a region")
  key = region.strip().lower()
  if key not in REGIONS:
    import difflib

    close = difflib.get_close_matches(key, REGIONS, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise CarbonInputError(
      f"unknown region {region!r}{hint} (known: {', '.join(REGIONS)}); "
      f"or give the intensity yourself"
    )
  return REGIONS[key]


# --------------------------------------------------------------------------
# Formulas
# --------------------------------------------------------------------------


def _check_positive(name: str, value: float) -> None:
  if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
    raise CarbonInputError(f"{name} must be a positive number, got {value!r}")


def _check_nonnegative(name: str, value: float) -> None:
  if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
    raise CarbonInputError(f"{name} must be a non-negative number, got {value!r}")


def check_pue(pue: float) -> float:
  # PUE is facility energy / IT energy, so below 1 is impossible.
  if not isinstance(pue, (int, float)) or not math.isfinite(pue) or pue < 1.0:
    raise CarbonInputError(f"PUE must be a number >= 1.0, got {pue!r}")
  return float(pue)


def energy_mwh(device_hours: float, power_w: float, pue: float = 1.0) -> float:
  """MWh = device-hours x W x PUE / 1e6 (pue=1.0 gives the raw device energy)."""
  _check_nonnegative("device_hours", device_hours)
  _check_positive("power_w", power_w)
  return device_hours * power_w * check_pue(pue) / 1e6


def co2_tonnes(mwh: float, intensity_kg_per_kwh: float) -> float:
  """t CO2eq = MWh x kg/kWh (the factors of 1000 cancel)."""
  _check_nonnegative("energy (MWh)", mwh)
  _check_nonnegative("intensity (kg/kWh)", intensity_kg_per_kwh)
  if intensity_kg_per_kwh > _MAX_KG_PER_KWH:
    raise CarbonInputError(
      f"grid intensity {intensity_kg_per_kwh:g} kg/kWh is above any real grid "
      f"(~1 kg/kWh at most); was it given in g/kWh?"
    )
  return mwh * intensity_kg_per_kwh


def device_hours_from_flops(
  total_flops: float, mfu: float, peak_tflops: float, device_count: int = 1
) -> tuple[float, float]:
  """(device-hours, wall-clock hours) to execute `total_flops` at a given MFU."""
  _check_positive("total FLOPs", total_flops)
  _check_positive("peak TFLOPS", peak_tflops)
  if not isinstance(mfu, (int, float)) or not 0 < mfu <= 1:
    raise CarbonInputError(f"MFU must be in (0, 1], got {mfu!r}")
  _check_count(device_count)
  device_seconds = total_flops / (mfu * peak_tflops * 1e12)
  device_hours = device_seconds / 3600
  return device_hours, device_hours / device_count


def _check_count(count: int) -> None:
  if not isinstance(count, int) or isinstance(count, bool) or count < 1:
    raise CarbonInputError(f"device count must be a positive integer, got {count!r}")


def project_run(
  device: str,
  *,
  count: int = 1,
  hours: float | None = None,
  device_hours: float | None = None,
  total_flops: float | None = None,
  mfu: float | None = None,
  peak_tflops: float | None = None,
  power_w: float | None = None,
  pue: float = 1.0,
  intensity_kg_per_kwh: float | None = None,
  region: str | None = None,
) -> dict[str, Any]:
  """Energy and carbon of a full-scale run, with every input that produced it.

  Time comes from exactly one of: `hours` (wall clock, times `count`),
  `device_hours`, or `total_flops` + `mfu` (at the device's peak, or
  `peak_tflops`). Carbon needs `intensity_kg_per_kwh` or `region`; without
  either only energy is returned.
  """
  spec = resolve_device(device)
  _check_count(count)
  given = [x is not None for x in (hours, device_hours, total_flops)]
  if sum(given) != 1:
    raise CarbonInputError("give exactly one of hours, device_hours, or total FLOPs (+ MFU)")
  out: dict[str, Any] = {"device": spec.name, "device_input": device, "count": count}
  if total_flops is not None:
    if mfu is None:
      raise CarbonInputError("projecting from FLOPs needs an assumed MFU")
    peak = peak_tflops if peak_tflops is not None else spec.peak_tflops
    if peak is None:
      raise CarbonInputError(f"no published peak TFLOPS for {spec.name}; pass peak_tflops")
    device_hours, hours = device_hours_from_flops(total_flops, mfu, peak, count)
    out.update(
      total_flops=total_flops,
      mfu=mfu,
      peak_tflops=peak,
      peak_source="user-supplied" if peak_tflops is not None else spec.source,
    )
  elif hours is not None:
    _check_nonnegative("hours", hours)
    device_hours = hours * count
  else:
    _check_nonnegative("device_hours", device_hours)
    hours = device_hours / count
  watts, power_source = device_power_w(device, power_w)
  pue = check_pue(pue)
  raw = energy_mwh(device_hours, watts, 1.0)
  scaled = energy_mwh(device_hours, watts, pue)
  out.update(
    hours=hours,
    device_hours=device_hours,
    power_w=watts,
    power_source=power_source,
    pue=pue,
    energy_mwh_raw=raw,
    energy_mwh=scaled,
  )
  if intensity_kg_per_kwh is None and region is None:
    out.update(intensity_kg_per_kwh=None, intensity_source=None, co2_tonnes=None)
    return out
  if intensity_kg_per_kwh is not None:
    if region is not None:
      raise CarbonInputError("give a grid intensity or a region, not both")
    _check_nonnegative("intensity", intensity_kg_per_kwh)
    kg, source = float(intensity_kg_per_kwh), f"user-supplied ({intensity_kg_per_kwh:g} kg/kWh)"
  else:
    g, source = grid_intensity(region=region)
    kg = g / 1000
  out.update(
    region=region,
    intensity_kg_per_kwh=kg,
    intensity_source=source,
    co2_tonnes=co2_tonnes(scaled, kg),
  )
  return out
