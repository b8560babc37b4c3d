"""Energy of a running job, measured where the machine allows and estimated always.

Two figures are kept side by side and never mixed:
  - measured: hardware energy counters read at the start and at each `read()`;
    NVIDIA GPUs through NVML's total-energy counter (pynvml, optional), CPUs
    through RAPL package counters under /sys/class/powercap (often root-only).
  - estimated: published power per device (core/tracking/carbon.py) x device
    count x elapsed time. This assumes the device draws its rated power all
    the time, an upper bound of the usual kind (LLaMA Table 15 convention).
`energy_kwh` is the measured figure when there is one, else the estimate;
PUE scaling and carbon are applied to it and reported separately. No network.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from core.tracking import carbon

logger = logging.getLogger(__name__)

POWERCAP = Path("/sys/class/powercap")

# Fallback CPU power when the machine exposes no power limit: Intel Xeon
# Platinum 8480+ (Intel ARK: 350 W TDP, 56 cores) = 6.25 W per core. It is an
# assumption, recorded as such with every run that uses it.
DEFAULT_CPU_W_PER_CORE = 6.25
_DEFAULT_CPU_SOURCE = (
  "estimate: {cores} cores x 6.25 W/core (ablax default, from Intel Xeon "
  "Platinum 8480+: 350 W TDP / 56 cores, Intel ARK); no RAPL power limit "
  "readable on this machine"
)


def _read_int(path: Path) -> int | None:
  try:
    return int(path.read_text().strip())
  except (OSError, ValueError):
    return None


def _rapl_packages(root: Path = POWERCAP) -> list[Path]:
  """Top-level RAPL package domains (intel-rapl:N, also used by AMD); not sub-domains."""
  out = []
  for path in sorted(glob.glob(str(root / "intel-rapl:*"))):
    p = Path(path)
    if p.name.count(":") != 1:
      continue
    name = (p / "name").read_text().strip() if (p / "name").exists() else ""
    if name.startswith("package"):
      out.append(p)
  return out


def cpu_power_w(root: Path = POWERCAP) -> tuple[float, str]:
  """(watts for the host CPU, where the figure comes from).

  The RAPL long-term package power limit (PL1) defaults to the CPU's TDP and
  is readable without privileges where RAPL exists; otherwise a documented
  per-core default times the cores this process may use.
  """
  total, limits = 0.0, []
  for package in _rapl_packages(root):
    uw = _read_int(package / "constraint_0_power_limit_uw")
    if uw:
      total += uw / 1e6
      limits.append(package.name)
  if total > 0:
    return total, (
      f"estimate: RAPL long-term package power limit (PL1, the configured TDP) "
      f"of {', '.join(limits)} under {root}"
    )
  try:
    cores = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    cores = os.cpu_count() or 1
  return cores * DEFAULT_CPU_W_PER_CORE, _DEFAULT_CPU_SOURCE.format(cores=cores)


class _RaplCounter:
  """Cumulative joules of the CPU packages, unwrapping each counter's overflow."""

  name = "rapl"

  def __init__(self, root: Path = POWERCAP):
    self.domains = []
    for package in _rapl_packages(root):
      energy = _read_int(package / "energy_uj")  # None when root-only
      if energy is None:
        continue
      wrap = _read_int(package / "max_energy_range_uj") or 0
      self.domains.append([package / "energy_uj", wrap, energy, 0])  # path, wrap, last, acc
    self.devices = len(self.domains)

  def joules(self) -> float:
    total = 0
    for domain in self.domains:
      path, wrap, last, acc = domain
      now = _read_int(path)
      if now is None:
        raise OSError(f"{path} became unreadable")
      # A counter wraps at max_energy_range_uj (minutes at full load): read()
      # must run more often than that, which a training loop's logging does.
      acc += now - last if now >= last else now + wrap - last
      domain[2], domain[3] = now, acc
      total += acc
    return total / 1e6


class _NvmlCounter:
  """Cumulative joules of the GPUs visible to this process (NVML total-energy counter)."""

  name = "nvml"

  def __init__(self):
    import pynvml  # optional dependency; ImportError means "not measurable"

    pynvml.nvmlInit()
    self._nvml = pynvml
    count = pynvml.nvmlDeviceGetCount()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    indices = range(count)
    if visible and all(v.strip().isdigit() for v in visible.split(",")):
      indices = [int(v) for v in visible.split(",") if int(v) < count]
    self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
    self.devices = len(self._handles)
    self._start_mj = [pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]

  def joules(self) -> float:
    now = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]
    return sum(n - s for n, s in zip(now, self._start_mj)) / 1e3


class EnergyMeter:
  """Cumulative energy and carbon of this job, with every input that produced them.

  Args:
    device_kind: JAX `device_kind` ('NVIDIA H100 80GB HBM3', 'TPU v4', 'cpu', ...)
      or a short name ('a100'); an unknown kind is an error.
    device_count: accelerators in the whole job (all processes).
    pue: data-centre power usage effectiveness (>= 1).
    intensity_g_per_kwh / region: grid carbon intensity, a user value or a
      region of core.tracking.carbon.REGIONS; with neither, `co2_kg` is None.
    power_w: power per device for the estimate; required where no figure is
      published (TPU v5e/v5p/v6e), optional override elsewhere.
    local_device_count: devices this process can measure (default all); a
      measurement of fewer devices than `device_count` is scaled up and the
      inputs say so.
    host_count: hosts in the job; a CPU job's power is per host, not per JAX
      device (JAX may show one host as many CPU devices).
    measure: False skips hardware counters (estimate only).
  """

  def __init__(
    self,
    device_kind: str,
    device_count: int,
    pue: float = 1.0,
    intensity_g_per_kwh: float | None = None,
    region: str | None = None,
    power_w: float | None = None,
    *,
    local_device_count: int | None = None,
    host_count: int = 1,
    measure: bool = True,
    clock: Callable[[], float] = time.monotonic,
    powercap_root: Path = POWERCAP,
  ):
    self.spec = carbon.resolve_device(device_kind)
    self.device_kind = device_kind
    carbon._check_count(device_count)
    carbon._check_count(host_count)
    self.device_count = device_count
    self.host_count = host_count
    self.pue = carbon.check_pue(pue)
    self.is_cpu = self.spec.name == "cpu"
    if self.is_cpu:
      if power_w is not None:
        carbon._check_positive("power_w", power_w)
        self.power_w, self.power_source = float(power_w), f"user-supplied ({power_w:g} W per host)"
      else:
        self.power_w, self.power_source = cpu_power_w(powercap_root)
      self.estimate_units = host_count
    else:
      self.power_w, self.power_source = carbon.device_power_w(device_kind, power_w)
      self.estimate_units = device_count
    self.power_user_supplied = power_w is not None
    self.region = region
    if intensity_g_per_kwh is None and region is None:
      self.intensity_g_per_kwh, self.intensity_source = None, None
    else:
      self.intensity_g_per_kwh, self.intensity_source = carbon.grid_intensity(
        region, intensity_g_per_kwh
      )
    self.local_device_count = local_device_count
    self._measure = measure
    self._powercap_root = powercap_root
    self._clock = clock
    self._counter = None
    self._measure_note = "not attempted (measure=False)" if not measure else None
    self._t0 = None
    self._offset = {"elapsed_h": 0.0, "energy_kwh_measured": 0.0, "energy_kwh_estimated": 0.0}
    self._last: dict[str, Any] | None = None

  def start(self, resume_from: Mapping[str, Any] | None = None) -> "EnergyMeter":
    """Starts the clock and the counters.

    Args:
      resume_from: the last `read()` of an earlier process of the same run
        (e.g. saved with the checkpoint), so figures stay cumulative.
    """
    if resume_from:
      for key in self._offset:
        self._offset[key] = float(resume_from.get(key) or 0.0)
    self._t0 = self._clock()
    if self._measure:
      self._counter, self._measure_note = self._open_counter()
    return self

  def _open_counter(self):
    if self.spec.name.startswith("tpu"):
      return None, "no energy counter exposed for TPUs"
    try:
      counter = _RaplCounter(self._powercap_root) if self.is_cpu else _NvmlCounter()
    except ImportError:
      return None, "pynvml not installed (pip install nvidia-ml-py to measure GPU energy)"
    except Exception as e:  # noqa: BLE001  any NVML/RAPL failure means "unmeasurable"
      return None, f"energy counter unavailable: {type(e).__name__}: {e}"[:300]
    if counter.devices == 0:
      where = (
        f"readable RAPL package counters under {self._powercap_root}"
        if self.is_cpu
        else "GPUs visible to NVML"
      )
      return None, f"no {where}"
    try:
      counter.joules()
    except Exception as e:  # noqa: BLE001
      return None, f"energy counter unreadable: {e}"[:300]
    return counter, None

  def _measured_scale(self) -> float:
    if self._counter is None:
      return 1.0
    if self.is_cpu:
      return float(self.host_count)  # one host measured
    local = self.local_device_count or self._counter.devices
    return self.device_count / local

  def read(self) -> dict[str, float | None]:
    """Cumulative figures since `start()` (plus any resumed offset).

    Keys: elapsed_h, energy_kwh_measured (None when unmeasurable),
    energy_kwh_estimated, energy_kwh (measured if available, else estimated),
    energy_kwh_pue (energy_kwh x PUE), co2_kg (None without an intensity).
    """
    if self._t0 is None:
      raise RuntimeError("EnergyMeter: call start() first")
    hours = (self._clock() - self._t0) / 3600 + self._offset["elapsed_h"]
    estimated = (
      self.power_w * self.estimate_units * (hours - self._offset["elapsed_h"]) / 1000
      + self._offset["energy_kwh_estimated"]
    )
    measured = None
    if self._counter is not None:
      try:
        kwh = self._counter.joules() / 3.6e6 * self._measured_scale()
        measured = kwh + self._offset["energy_kwh_measured"]
      except Exception as e:  # noqa: BLE001  a counter that fails stays off
        logger.warning("energy counter failed (%s); estimates only from now on", e)
        self._measure_note = f"counter failed mid-run: {e}"[:300]
        self._counter = None
    energy = measured if measured is not None else estimated
    energy_pue = energy * self.pue
    co2 = None if self.intensity_g_per_kwh is None else energy_pue * self.intensity_g_per_kwh / 1000
    self._last = {
      "elapsed_h": hours,
      "energy_kwh_measured": measured,
      "energy_kwh_estimated": estimated,
      "energy_kwh": energy,
      "energy_kwh_pue": energy_pue,
      "co2_kg": co2,
    }
    return dict(self._last)

  def inputs(self) -> dict[str, Any]:
    """Every input needed to recompute `read()` by hand, with the sources of the figures."""
    last = self._last or {}
    measured = self._counter is not None
    scale = self._measured_scale()
    return {
      "device_kind": self.device_kind,
      "device": self.spec.name,
      "device_count": self.device_count,
      "host_count": self.host_count,
      "power_w": self.power_w,
      "power_per": "host CPU" if self.is_cpu else "device",
      "power_source": self.power_source,
      "power_user_supplied": self.power_user_supplied,
      "estimate_formula": (
        f"energy_kwh_estimated = power_w x "
        f"{'host_count' if self.is_cpu else 'device_count'} x elapsed_h "
        f"/ 1000 (rated power, all the time)"
      ),
      "energy_source": "measured" if measured else "estimated",
      "measured_with": self._counter.name if measured else None,
      "measured_devices": self._counter.devices if measured else 0,
      "measured_scale": scale if measured else None,
      "measure_note": self._measure_note
      if not measured
      else (
        f"{self._counter.devices} {'package(s)' if self.is_cpu else 'device(s)'} of process "
        f"0 measured, scaled x{scale:g} to the whole job"
        if scale != 1
        else None
      ),
      "pue": self.pue,
      "intensity_g_per_kwh": self.intensity_g_per_kwh,
      "intensity_source": self.intensity_source or "none given: co2_kg not computed",
      "region": self.region,
      "carbon_formula": (
        "energy_kwh_pue = energy_kwh x pue; co2_kg = energy_kwh_pue x intensity_g_per_kwh / 1000"
      ),
      "elapsed_h": last.get("elapsed_h"),
      "resumed_from": dict(self._offset) if any(self._offset.values()) else None,
    }
