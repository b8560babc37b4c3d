"""Throughput, MFU and ETA: model FLOPs over peak FLOPs, peak from a table or measured on CPU.

MFU (PaLM, appendix B) counts the FLOPs the model needs per token
(core.model.flops.flops_per_token: 6 x matmul parameters + attention), not
the FLOPs the hardware executes, so rematerialization lowers MFU instead of
raising it. Peak FLOP/s come from the vendors' dense spec sheets for
accelerators; a CPU has no meaningful sheet value, so its peak is measured: the
best float32 matmul rate XLA reaches on this machine.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)


def table_peak(device_kind: str, dtype: str = "bfloat16") -> float | None:
  """Per-device dense peak FLOP/s from the one device table (core.tracking.carbon), or None.

  None for a device the table does not know, or a dtype it gives no figure for:
  MFU is then not reported, never divided by another device's peak.
  """
  from core.tracking import carbon  # pylint: disable=g-import-not-at-top

  try:
    spec = carbon.resolve_device(device_kind)
  except carbon.CarbonInputError:
    return None
  tflops = spec.fp32_tflops if dtype == "float32" else spec.peak_tflops
  return None if tflops is None else tflops * 1e12


# Overrides the measured CPU peak (FLOP/s per process), e.g. with bench/train_throughput.py's figure.
PEAK_ENV = "ABLAX_CPU_PEAK_FLOPS"


def matmul_rate(m: int, k: int, n: int, *, repeats: int = 3, chain: int = 2, device=None) -> float:
  """The best float32 FLOP/s of (m, k) @ (k, n) matmuls on `device` (default: the first).

  Each of `chain` loop iterations multiplies (m, k) @ (k, n) @ (n, k), which
  keeps the shape so the chain can loop and keeps dispatch overhead out of the
  measurement. The best of `repeats` runs is taken: the figure is a ceiling, and
  a shared machine only ever makes runs slower.
  """
  device = device or jax.local_devices()[0]
  rng = np.random.default_rng(0)
  # Scaled so that values stay O(1) along the chain.
  a, b, c = (
    jax.device_put(jnp.asarray(x, jnp.float32), device)
    for x in (
      rng.standard_normal((m, k)),
      rng.standard_normal((k, n)) / np.sqrt(k),
      rng.standard_normal((n, k)) / np.sqrt(n),
    )
  )
  run = jax.jit(lambda x: jax.lax.fori_loop(0, chain, lambda _, y: (y @ b) @ c, x))
  run(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    run(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return chain * 2 * (2 * m * k * n) / best


@functools.lru_cache(maxsize=None)
def measured_cpu_peak(size: int = 1024) -> float:
  """The best float32 matmul FLOP/s of this process's CPU (all its threads), measured.

  One device runs the matmul; XLA's CPU backend spreads one matmul over every
  core, so this is the machine's rate whatever the fake device count.
  """
  return matmul_rate(size, size, size, device=jax.local_devices(backend="cpu")[0])


def peak_flops(devices, dtype: str = "float32") -> tuple[float, str]:
  """(total peak FLOP/s of `devices`, where the number comes from)."""
  devices = list(devices)
  kind = devices[0].device_kind
  if devices[0].platform == "cpu":
    processes = len({d.process_index for d in devices})
    if os.environ.get(PEAK_ENV):
      return float(os.environ[PEAK_ENV]) * processes, f"{PEAK_ENV} x {processes} process(es)"
    # Fake CPU devices share one machine's cores: the peak is per process, not per device.
    return (
      measured_cpu_peak() * processes,
      f"measured float32 matmul on {processes} CPU process(es)",
    )
  per_device = table_peak(kind, dtype)
  if per_device is None:
    logger.warning("no peak FLOP/s known for device kind %r; MFU is not reported", kind)
    return float("nan"), f"unknown device {kind!r}"
  return per_device * len(devices), f"spec sheet {kind} {dtype} x {len(devices)}"


def format_duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_rate(x: float) -> str:
  for unit, scale in (("M", 1e6), ("k", 1e3)):
    if x >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.0f}"


class Meter:
  """Tokens/s and MFU over the steps since the last report, ETA from the recent rate."""

  def __init__(self, flops_per_token: float, peak: float, total_steps: int, start_step: int):
    self.flops_per_token, self.peak = flops_per_token, peak
    self.total_steps = total_steps
    self._mark(start_step)

  def _mark(self, step: int) -> None:
    self._t, self._step, self._tokens = time.perf_counter(), step, 0.0

  def add_tokens(self, n: float) -> None:
    self._tokens += n

  def report(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    dt = max(now - self._t, 1e-9)
    steps = max(step - self._step, 1)
    tokens_per_s = self._tokens / dt
    out = {
      "tokens_per_s": tokens_per_s,
      "step_time_s": dt / steps,
      "mfu": tokens_per_s * self.flops_per_token / self.peak if self.peak else float("nan"),
      "eta_s": (self.total_steps - step) * dt / steps,
    }
    self._mark(step)
    return out
