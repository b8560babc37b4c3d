"""EnergyMeter: estimates from the cited table, measured counters kept apart, bad input."""

import sys
import types

import pytest

from core.tracking import carbon
from core.tracking.energy import DEFAULT_CPU_W_PER_CORE, EnergyMeter, cpu_power_w


class FakeClock:
  def __init__(self):
    self.t = 1000.0

  def __call__(self):
    return self.t

  def advance(self, hours):
    self.t += hours * 3600


def _powercap(root, energy_uj, limit_uw=150_000_000, wrap=262_143_328_850):
  pkg = root / "intel-rapl:0"
  pkg.mkdir(parents=True, exist_ok=True)
  (pkg / "name").write_text("package-0\n")
  (pkg / "energy_uj").write_text(f"{energy_uj}\n")
  (pkg / "max_energy_range_uj").write_text(f"{wrap}\n")
  (pkg / "constraint_0_power_limit_uw").write_text(f"{limit_uw}\n")
  sub = root / "intel-rapl:0:0"  # a sub-domain (core), must not be counted twice
  sub.mkdir(exist_ok=True)
  (sub / "name").write_text("core\n")
  (sub / "energy_uj").write_text("5\n")
  return pkg


def test_gpu_estimate_and_carbon_by_hand():
  clock = FakeClock()
  meter = EnergyMeter(
    "NVIDIA A100-SXM4-80GB", 8, pue=1.1, region="us-average-llama", measure=False, clock=clock
  ).start()
  clock.advance(10)
  r = meter.read()
  assert r["energy_kwh_measured"] is None
  assert r["energy_kwh_estimated"] == pytest.approx(0.4 * 8 * 10)
  assert r["energy_kwh"] == r["energy_kwh_estimated"]
  assert r["energy_kwh_pue"] == pytest.approx(32 * 1.1)
  assert r["co2_kg"] == pytest.approx(32 * 1.1 * 0.385)
  inputs = meter.inputs()
  # Everything needed to recompute the figure is in the inputs.
  assert inputs["power_w"] * inputs["device_count"] * inputs["elapsed_h"] / 1000 == pytest.approx(
    r["energy_kwh_estimated"]
  )
  assert r["energy_kwh"] * inputs["pue"] * inputs["intensity_g_per_kwh"] / 1000 == pytest.approx(
    r["co2_kg"]
  )
  assert "A100" in inputs["power_source"] and "LLaMA" in inputs["intensity_source"]
  assert inputs["energy_source"] == "estimated" and inputs["power_user_supplied"] is False


def test_no_intensity_means_no_carbon():
  meter = EnergyMeter("H100", 1, measure=False, clock=FakeClock()).start()
  assert meter.read()["co2_kg"] is None
  assert "none given" in meter.inputs()["intensity_source"]


def test_tpu_v5e_needs_a_user_power_and_says_it_was_supplied():
  with pytest.raises(carbon.CarbonInputError, match="power_w"):
    EnergyMeter("TPU v5 lite", 256, pue=1.1, intensity_g_per_kwh=100)
  clock = FakeClock()
  meter = EnergyMeter(
    "TPU v5 lite", 256, pue=1.1, intensity_g_per_kwh=100, power_w=250, clock=clock
  ).start()
  clock.advance(2)
  assert meter.read()["energy_kwh_estimated"] == pytest.approx(0.25 * 256 * 2)
  inputs = meter.inputs()
  assert inputs["power_user_supplied"] and "user-supplied" in inputs["power_source"]
  assert inputs["energy_source"] == "estimated" and "TPU" in inputs["measure_note"]


def test_cpu_measured_by_rapl_apart_from_the_estimate(tmp_path):
  pkg = _powercap(tmp_path, energy_uj=1_000_000)
  clock = FakeClock()
  meter = EnergyMeter(
    "cpu", 8, pue=1.2, intensity_g_per_kwh=300, clock=clock, powercap_root=tmp_path
  ).start()
  clock.advance(1)
  (pkg / "energy_uj").write_text(f"{1_000_000 + 360_000_000_000}\n")  # +360 kJ = 0.1 kWh
  r = meter.read()
  assert r["energy_kwh_measured"] == pytest.approx(0.1)
  # The estimate is per host (150 W limit), not per JAX CPU device.
  assert r["energy_kwh_estimated"] == pytest.approx(0.15)
  assert r["energy_kwh"] == r["energy_kwh_measured"]
  assert r["energy_kwh_pue"] == pytest.approx(0.12)
  inputs = meter.inputs()
  assert inputs["measured_with"] == "rapl" and inputs["energy_source"] == "measured"
  assert "RAPL" in inputs["power_source"] and inputs["power_per"] == "host CPU"


def test_rapl_counter_wraparound(tmp_path):
  wrap = 1_000_000_000
  pkg = _powercap(tmp_path, energy_uj=wrap - 100_000_000, wrap=wrap)
  meter = EnergyMeter("cpu", 1, clock=FakeClock(), powercap_root=tmp_path).start()
  (pkg / "energy_uj").write_text("50000000\n")  # wrapped: 100 J + 50 J
  assert meter.read()["energy_kwh_measured"] == pytest.approx(150 / 3.6e6)


def test_cpu_without_powercap_uses_the_documented_default(tmp_path):
  watts, source = cpu_power_w(tmp_path)
  assert watts % DEFAULT_CPU_W_PER_CORE == 0 and source.startswith("estimate")
  assert "6.25 W/core" in source
  meter = EnergyMeter("cpu", 8, powercap_root=tmp_path, clock=FakeClock()).start()
  assert meter.read()["energy_kwh_measured"] is None
  assert "RAPL" in meter.inputs()["measure_note"]


def test_nvml_measurement_scaled_to_the_job(monkeypatch):
  energy_mj = {0: 1_000_000, 1: 2_000_000}
  fake = types.SimpleNamespace(
    nvmlInit=lambda: None,
    nvmlDeviceGetCount=lambda: 2,
    nvmlDeviceGetHandleByIndex=lambda i: i,
    nvmlDeviceGetTotalEnergyConsumption=lambda h: energy_mj[h],
  )
  monkeypatch.setitem(sys.modules, "pynvml", fake)
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  clock = FakeClock()
  meter = EnergyMeter(
    "NVIDIA H100 80GB HBM3", 4, pue=1.1, region="europe-west4", local_device_count=2, clock=clock
  ).start()
  clock.advance(1)
  energy_mj[0] += 1_800_000_000  # 1.8 MJ = 0.5 kWh per GPU
  energy_mj[1] += 1_800_000_000
  r = meter.read()
  assert r["energy_kwh_measured"] == pytest.approx(1.0 * 2)  # 2 of 4 devices measured, x2
  assert r["energy_kwh_estimated"] == pytest.approx(0.7 * 4)
  assert r["co2_kg"] == pytest.approx(2.0 * 1.1 * 236 / 1000)
  inputs = meter.inputs()
  assert inputs["measured_with"] == "nvml" and inputs["measured_scale"] == 2
  assert "scaled" in inputs["measure_note"]


def test_missing_pynvml_falls_back_to_the_estimate(monkeypatch):
  monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
  meter = EnergyMeter("a100", 1, clock=FakeClock()).start()
  assert meter.read()["energy_kwh_measured"] is None
  assert "pynvml" in meter.inputs()["measure_note"]


def test_resume_keeps_figures_cumulative():
  clock = FakeClock()
  first = EnergyMeter("a100", 2, measure=False, clock=clock).start()
  clock.advance(3)
  saved = first.read()
  second = EnergyMeter("a100", 2, measure=False, clock=clock).start(resume_from=saved)
  clock.advance(1)
  r = second.read()
  assert r["elapsed_h"] == pytest.approx(4)
  assert r["energy_kwh_estimated"] == pytest.approx(0.4 * 2 * 4)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(device_kind="Graphcore IPU", device_count=1), "unknown device"),
    (dict(device_kind="a100", device_count=0), "count"),
    (dict(device_kind="a100", device_count=1, pue=0.5), "PUE"),
    (dict(device_kind="a100", device_count=1, power_w=-5), "positive"),
    (dict(device_kind="a100", device_count=1, region="mars-north1"), "unknown region"),
    (dict(device_kind="a100", device_count=1, intensity_g_per_kwh=-1), "non-negative"),
    (
      dict(device_kind="a100", device_count=1, region="us-east1", intensity_g_per_kwh=300),
      "not both",
    ),
  ],
)
def test_bad_input(kwargs, match):
  with pytest.raises(carbon.CarbonInputError, match=match):
    EnergyMeter(**kwargs)


def test_read_before_start_is_an_error():
  with pytest.raises(RuntimeError, match="start"):
    EnergyMeter("a100", 1).read()
