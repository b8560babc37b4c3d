"""Compile a run's train step for a target and read what XLA says about it.

The step is the run's own (core.train.step.make_builder: the same model,
optimizer recipe, shardings and donation), lowered with ShapeDtypeStruct
inputs on the target's compile-only devices. Nothing is allocated and nothing
runs; what comes back is per-device memory, the compiler's FLOP count and,
where the step does not fit, the compiler's own verdict.
"""

from __future__ import annotations

import dataclasses
import re
import resource
import time
from typing import Any, Callable

import jax

from core.model import attention_impls
from core.model.flops import flops_per_token
from core.plan.targets import Target
from core.train import mesh as meshlib
from core.train.step import StepBuilder, abstract_batch

# libtpu's two overflow messages: "Used 43.15G of 15.75G hbm. Exceeded hbm capacity by
# 27.40G." and "the total memory required for HLO temporaries (29.42G) exceeds available
# HBM (15.75G)." Both give (what was needed, what the chip has).
_TPU_OOM = (
  re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"),
  re.compile(
    r"required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available "
    r"HBM \(([\d.]+)([KMGT])\)"
  ),
)
_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass
class StepPlan:
  """What the compiler reports for one step on one device of the target.

  Attributes:
    target: the target's name; platform: 'tpu' or 'gpu'.
    mesh: {'data': .., 'fsdp': .., 'tensor': ..}.
    batch, seq: global rows and tokens per row of one step.
    fits: whether the step fits in `usable_bytes` per device.
    verdict_by: 'compiler' (TPU: libtpu refuses an overflowing program) or
      'peak vs usable' (GPU: XLA does not check; the plan compares).
    argument_bytes, output_bytes, alias_bytes, temp_bytes, peak_bytes: per
      device, from compiled.memory_analysis(); None where the compile failed.
      The arguments are the state shard and the batch shard; the outputs alias
      them (donation). The peak is XLA's own (peak_memory_in_bytes).
    used_bytes, overflow_bytes: the compiler's own figures when it refused
      (what it needed; by how much that exceeds the chip).
    usable_bytes: per-device memory the step may use (the compiler's figure
      when it refused, e.g. 15.75 GiB of a 16 GiB v5e).
    xla_flops: FLOPs of one step over all devices as XLA counts them (None on
      GPU, where cost_analysis gives none).
    model_flops: 6N + attention FLOPs of one step (core.model.flops), the MFU
      numerator.
    compile_s: wall time of lowering + compiling here.
    host_peak_bytes: peak resident memory of this process so far.
    attention: {'global': impl, 'local': impl} chosen for the target.
    scan_layers: whether the layers are one loop (XLA's FLOP count then covers
      one iteration of it, not the whole step).
    message: the compiler's message when it refused.
  """

  target: str
  platform: str
  mesh: dict[str, int]
  batch: int
  seq: int
  fits: bool
  verdict_by: str
  usable_bytes: int
  model_flops: float
  compile_s: float
  host_peak_bytes: int
  attention: dict[str, str]
  scan_layers: bool = False
  argument_bytes: int | None = None
  output_bytes: int | None = None
  alias_bytes: int | None = None
  temp_bytes: int | None = None
  peak_bytes: int | None = None
  used_bytes: int | None = None
  overflow_bytes: int | None = None
  xla_flops: float | None = None
  message: str = ""

  @property
  def per_device_bytes(self) -> int | None:
    """The figure the verdict is about: the peak, or what the compiler said it needed."""
    return self.peak_bytes if self.peak_bytes is not None else self.used_bytes


def plan_step(
  make: Callable[[jax.sharding.Mesh], StepBuilder],
  target: Target,
  mesh_config: meshlib.MeshConfig,
  batch: int,
  seq: int,
) -> StepPlan:
  """Compiles the step that `make(mesh)` builds for a (batch, seq) batch on `target`."""
  devices = target.devices()
  mesh = meshlib.make_mesh(mesh_config, devices)
  shape = (batch, seq)
  start = time.perf_counter()
  with attention_impls.target_platform(target.platform):
    builder = make(mesh)
    config = builder.config
    # The trainer always passes segment ids (packed rows), so 'auto' decides as here.
    kinds = attention_impls.used_by_kind(config, target.platform, seq, packed=True)
    common = dict(
      target=target.name,
      platform=target.platform,
      mesh=dict(mesh.shape),
      batch=batch,
      seq=seq,
      usable_bytes=target.usable_bytes,
      model_flops=flops_per_token(config, seq) * batch * seq,
      attention=kinds,
      scan_layers=config.scan_layers,
      verdict_by="compiler" if target.platform == "tpu" else "peak vs usable",
    )
    try:
      lowered = builder.build(shape).lower(
        builder.abstract_state(), abstract_batch(builder, shape), builder.step_inputs()
      )
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      text = str(e)
      if "RESOURCE_EXHAUSTED" not in text:
        raise
      return _refused(text, common, start)
  memory = compiled.memory_analysis()
  cost = _cost(compiled)
  peak = _peak(memory)
  # libtpu refuses a program that does not fit (above); XLA's GPU compiler never does.
  fits = True if target.platform == "tpu" else peak <= target.usable_bytes
  return StepPlan(
    **common,
    fits=fits,
    compile_s=time.perf_counter() - start,
    host_peak_bytes=_host_peak(),
    argument_bytes=memory.argument_size_in_bytes,
    output_bytes=memory.output_size_in_bytes,
    alias_bytes=memory.alias_size_in_bytes,
    temp_bytes=memory.temp_size_in_bytes,
    peak_bytes=peak,
    xla_flops=None if cost is None else cost * target.num_devices,
  )


def _refused(text: str, common: dict[str, Any], start: float) -> StepPlan:
  used = overflow = None
  for pattern in _TPU_OOM:
    m = pattern.search(text)
    if m:
      used = int(float(m.group(1)) * _UNIT[m.group(2)])
      capacity = int(float(m.group(3)) * _UNIT[m.group(4)])
      overflow = used - capacity
      common = {**common, "usable_bytes": capacity}
      break
  first = next(
    (line.strip() for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line),
    text.strip().splitlines()[0],
  )
  return StepPlan(
    **common,
    fits=False,
    compile_s=time.perf_counter() - start,
    host_peak_bytes=_host_peak(),
    used_bytes=used,
    overflow_bytes=overflow,
    message=first[:400],
  )


def _peak(memory) -> int:
  """XLA's peak of live buffers; where it gives none, arguments + temporaries + new outputs."""
  peak = getattr(memory, "peak_memory_in_bytes", 0) or 0
  if peak:
    return int(peak)
  return int(
    memory.argument_size_in_bytes
    + memory.temp_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
  )


def _cost(compiled) -> float | None:
  """FLOPs of the per-device program, or None where the backend does not count them."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  backends without a cost model raise or return None
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def _host_peak() -> int:
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
