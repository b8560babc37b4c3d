"""Step time with and without the run tracker logging ~10 metrics per step.

A tiny jitted JAX step (a two-layer MLP's loss and gradient) runs in blocks
that alternate between "tracker off" and "tracker on", so drift of a shared
machine hits both alike. With the tracker on, every step logs 10 metrics (JAX
scalars straight from the step), which one thread writes to the run's journal
and another uploads to a local sqlite store. Prints the median step time of
each and their ratio; the claim is a ratio within 1.01.

  .venv/bin/python bench/tracking_overhead.py [--steps 2000] [--blocks 10] [--uri URI]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2000, help="steps per configuration")
  parser.add_argument("--blocks", type=int, default=40, help="alternating blocks")
  parser.add_argument("--width", type=int, default=256, help="MLP width (sets the step time)")
  parser.add_argument(
    "--uri", default=None, help="tracking URI (default: a temporary sqlite store)"
  )
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp

  from core.tracking.run import RunTracker

  key = jax.random.PRNGKey(0)
  k1, k2, k3 = jax.random.split(key, 3)
  params = {
    "w1": jax.random.normal(k1, (args.width, args.width)) * 0.05,
    "w2": jax.random.normal(k2, (args.width, 1)) * 0.05,
  }
  x = jax.random.normal(k3, (64, args.width))
  y = jnp.sum(x, axis=1, keepdims=True)

  def loss_fn(p):
    return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)

  @jax.jit
  def step(p):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    gnorm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    p = jax.tree.map(lambda a, g: a - 1e-3 * g, p, grads)
    return p, loss, gnorm

  params, loss, gnorm = step(params)  # compile
  jax.block_until_ready(params)

  workdir = Path(tempfile.mkdtemp(prefix="ablax-bench-"))
  uri = args.uri or f"sqlite:///{workdir / 'mlflow.db'}"
  tracker = RunTracker(uri, "bench-tracking-overhead", run_name="overhead", workdir=workdir / "run")
  tracker.start()

  per_block = max(1, args.steps // args.blocks)
  times = {False: [], True: []}
  call_times = []
  global_step = 0
  for block in range(2 * args.blocks):
    logging_on = block % 2 == 1
    for _ in range(per_block):
      t0 = time.perf_counter()
      params, loss, gnorm = step(params)
      if logging_on:
        t_call = time.perf_counter()
        tracker.log_metrics(
          {
            "train/loss": loss,
            "train/grad_norm": gnorm,
            "train/lr": 1e-3,
            "perf/tokens_per_s": 123456.0,
            "perf/mfu": 0.42,
            "perf/step_time_s": 0.001,
            "energy/energy_kwh": 0.001,
            "energy/energy_kwh_pue": 0.0011,
            "energy/co2_kg": 0.0004,
            "train/tokens": float(global_step * 4096),
          },
          global_step,
        )
        call_times.append(time.perf_counter() - t_call)
      jax.block_until_ready(params)
      times[logging_on].append(time.perf_counter() - t0)
      global_step += 1

  t0 = time.perf_counter()
  delivered = tracker.flush(120)
  drain_s = time.perf_counter() - t0
  tracker.end()
  off, on = statistics.median(times[False]), statistics.median(times[True])
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, store: {uri}")
  print(f"steps per configuration: {len(times[False])}, metrics per logged step: 10")
  print(f"median step time, tracker off: {off * 1e6:9.1f} us")
  print(f"median step time, tracker on:  {on * 1e6:9.1f} us")
  print(f"ratio (on / off, median):      {on / off:9.4f}")
  print(
    f"log_metrics call (10 metrics): median {statistics.median(call_times) * 1e6:.1f} us, "
    f"p99 {sorted(call_times)[int(0.99 * len(call_times))] * 1e6:.1f} us"
  )
  print(
    f"upload thread CPU: {tracker.writer_cpu_s:.2f} s for {len(call_times)} logged steps "
    f"= {tracker.writer_cpu_s / len(call_times) * 1e6:.0f} us per step "
    f"({tracker.writer_cpu_s / sum(times[True]) * 100:.2f}% of the logged steps' wall time)"
  )
  print(f"uploader drained the rest in {drain_s:.2f} s after the loop; all delivered: {delivered}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
