"""Training throughput and MFU of the tiny presets and cpu_bench, with compile and step time apart.

    .venv/bin/python bench/train_throughput.py [--configs cpu_bench tiny_llama ...] [--steps 10]

For each experiment (gin/experiments/<name>.gin) it builds the real train step
(core.train.step: loss, gradients, the experiment's optimizer recipe, jit with
shardings and donation) on one device, feeds synthetic batches already on the
device (the model is timed, not the tokenizer; bench/data_throughput.py times
that), and reports:

- compile time (lower + compile) and the median step time over --steps steps;
- tokens/s and MFU = flops_per_token(config, seq_len) x tokens/s / peak, the peak
  on CPU being the best float32 matmul rate measured here (1024^3 and the
  model's own MLP shape), on accelerators the spec-sheet value;
- where the time goes: forward alone, forward + backward, and the whole step
  (the optimizer update is the difference), plus the FLOPs XLA counts in the
  compiled step against the model FLOPs.

--peer times ablax's cpu_bench step against bench/peer_step.py, a plain JAX +
optax step of the same shape with no ablax import, alternately in this one
process (rounds of --steps steps each), and prints the tokens/s ratio of the
medians: ours / peer.

--profile_dir writes a jax.profiler trace of 3 steps (open with TensorBoard or
Perfetto). Numbers on a shared machine vary: medians are reported, and the
peak is measured in the same process just before.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from core.train.throughput import matmul_rate  # noqa: E402

DEFAULT_CONFIGS = ("tiny_llama", "tiny_gemma", "tiny_gemma2", "cpu_bench")


def load_experiment(name: str, gin_params: list[str]):
  """(ModelConfig, batch_size, seq_len, optimizer factory) as the experiment's gin files bind them."""
  import gin  # pylint: disable=g-import-not-at-top
  from core.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from core.train import optimizer  # pylint: disable=g-import-not-at-top
  from launch import gin_config  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  gin_config.parse([f"gin/experiments/{name}.gin"], gin_params, finalize=False)
  config = gin_config.build(ModelConfig)
  batch_size = gin_config.resolve_macro(gin.query_parameter("core.train.loop.train.batch_size"))
  seq_len = gin.query_parameter("core.data.pipeline.lm_batches.seq_len")
  recipe = gin.query_parameter("core.train.loop.train.optimizer")
  fn = gin.get_configurable(getattr(optimizer, recipe.selector.split(".")[-1]))
  return config, batch_size, seq_len, fn


def one_device_step(name: str, gin_params: list[str]):
  """(config, batch_size, seq_len, builder, synthetic data) of the experiment's real train step
  on one device: the experiment's model and optimizer recipe, synthetic batches of its shape."""
  from core.train import mesh as meshlib, partition  # pylint: disable=g-import-not-at-top
  from core.train.step import make_builder  # pylint: disable=g-import-not-at-top
  from core.train.synthetic import SyntheticBatches  # pylint: disable=g-import-not-at-top

  config, batch_size, seq_len, recipe = load_experiment(name, gin_params)
  mesh = meshlib.make_mesh(meshlib.MeshConfig(1, 1, 1), jax.devices()[:1])
  builder = make_builder(config, recipe, mesh, partition.merged_rules(), num_steps=1000)
  data = SyntheticBatches(vocab_size=config.vocab_size, seq_len=seq_len, batch_size=batch_size)
  return config, batch_size, seq_len, builder, data


def _median_time(fn, args, steps: int) -> float:
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def bench(
  name: str,
  steps: int,
  gin_params: list[str],
  peak: float,
  breakdown: bool,
  profile_dir: str | None,
) -> dict:
  from core.model.flops import flops_per_token, param_counts  # pylint: disable=g-import-not-at-top
  from core.train.step import device_batch  # pylint: disable=g-import-not-at-top

  config, batch_size, seq_len, builder, data = one_device_step(name, gin_params)
  batches = [device_batch(next(data), builder.batch_sharding) for _ in range(4)]
  state = builder.init(0)

  t = time.perf_counter()
  inputs = builder.step_inputs()
  step = builder.build((batch_size, seq_len)).lower(state, batches[0], inputs).compile()
  compile_s = time.perf_counter() - t
  cost = step.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_flops = float((cost or {}).get("flops", float("nan")))

  def run_step(i):
    nonlocal state
    state, metrics = step(state, batches[i % len(batches)], inputs)
    return metrics["loss"]

  for i in range(2):
    jax.block_until_ready(run_step(i))
  times = []
  for i in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(run_step(i))
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  if profile_dir:
    with jax.profiler.trace(str(Path(profile_dir) / name)):
      for i in range(3):
        jax.block_until_ready(run_step(i))

  tokens = batch_size * seq_len
  fpt = flops_per_token(config, seq_len)
  result = {
    "config": name,
    "params": param_counts(config)["total"],
    "batch": batch_size,
    "seq_len": seq_len,
    "remat": config.remat,
    "compile_s": compile_s,
    "step_s_median": step_s,
    "step_s_min": min(times),
    "tokens_per_s": tokens / step_s,
    "model_flops_per_step": fpt * tokens,
    "xla_flops_per_step": xla_flops,
    "achieved_tflops": fpt * tokens / step_s / 1e12,
    "mfu": fpt * tokens / step_s / peak,
  }
  if breakdown:
    params = state.params
    loss = jax.jit(builder._loss)  # pylint: disable=protected-access
    grads = jax.jit(builder._grads)  # pylint: disable=protected-access
    jax.block_until_ready(loss(params, batches[0]))
    jax.block_until_ready(grads(params, batches[0], inputs))
    result["forward_s"] = _median_time(loss, (params, batches[0]), max(steps // 2, 3))
    result["forward_backward_s"] = _median_time(
      grads, (params, batches[0], inputs), max(steps // 2, 3)
    )
    result["update_s"] = step_s - result["forward_backward_s"]
  # The MLP's first matmul at this batch: the rate the model's biggest GEMMs can reach.
  result["mlp_shape_peak_flops"] = matmul_rate(
    tokens, config.embed_dim, config.mlp_dim, repeats=5, chain=2
  )
  return result


def peer_compare(steps: int, rounds: int, gin_params: list[str], peak: float) -> dict:
  """ablax's cpu_bench step against bench/peer_step.py, alternating, same data shape."""
  sys.path.insert(0, str(REPO / "bench"))
  import peer_step  # pylint: disable=g-import-not-at-top
  from core.model.flops import flops_per_token  # pylint: disable=g-import-not-at-top
  from core.train.step import device_batch  # pylint: disable=g-import-not-at-top

  config, batch_size, seq_len, builder, data = one_device_step("cpu_bench", gin_params)
  shape = (
    config.vocab_size,
    config.embed_dim,
    config.num_layers,
    config.num_heads,
    config.head_dim,
    config.mlp_dim,
  )
  peer_shape = (
    peer_step.VOCAB,
    peer_step.D,
    peer_step.LAYERS,
    peer_step.HEADS,
    peer_step.HEAD_DIM,
    peer_step.MLP,
  )
  if shape != peer_shape:
    raise SystemExit(f"bench/peer_step.py has shape {peer_shape}, cpu_bench {shape}")
  host = next(data)
  batch = device_batch(host, builder.batch_sharding)
  inputs = builder.step_inputs()
  ours = builder.build((batch_size, seq_len))
  state = builder.init(0)
  params = peer_step.init(jax.random.key(0))
  opt_state = peer_step.optimizer.init(params)
  tokens_in, targets = jax.device_put(host["inputs"]), jax.device_put(host["targets"])

  def run_ours():
    nonlocal state
    state, metrics = ours(state, batch, inputs)
    return metrics["loss"]

  def run_peer():
    nonlocal params, opt_state
    params, opt_state, loss = peer_step.train_step(params, opt_state, tokens_in, targets)
    return loss

  times = {"ours": [], "peer": []}
  for fn in (run_ours, run_peer):  # compile and warm up both
    for _ in range(2):
      jax.block_until_ready(fn())
  for r in range(rounds):
    for name, fn in (("ours", run_ours), ("peer", run_peer)):
      for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times[name].append(time.perf_counter() - t)
    print(
      f"round {r + 1}/{rounds}: ours {statistics.median(times['ours']) * 1e3:.0f} ms, "
      f"peer {statistics.median(times['peer']) * 1e3:.0f} ms",
      flush=True,
    )
  tokens = batch_size * seq_len
  fpt = flops_per_token(config, seq_len)
  out = {"steps_each": len(times["ours"]), "peak_flops": peak}
  for name, ts in times.items():
    med = statistics.median(ts)
    out[name] = {
      "step_s_median": med,
      "tokens_per_s": tokens / med,
      "mfu": fpt * tokens / med / peak,
      "step_s_all": ts,
    }
  out["ratio"] = out["ours"]["tokens_per_s"] / out["peer"]["tokens_per_s"]
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--no_breakdown", action="store_true")
  parser.add_argument("--profile_dir", default=None)
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  parser.add_argument(
    "--peer",
    action="store_true",
    help="cpu_bench against bench/peer_step.py, alternating (see above)",
  )
  parser.add_argument("--rounds", type=int, default=4, help="with --peer: alternations")
  args = parser.parse_args(argv)

  device = jax.devices()[0]
  if device.platform == "cpu":
    # On a shared machine one measurement can land in a busy moment; the peak is a
    # ceiling, so the best of all measurements (here and after each config) is used.
    peak = matmul_rate(1024, 1024, 1024, repeats=10, chain=8)
    source = "best measured float32 matmul (1024^3 and each model's MLP shape)"
  else:
    from core.train.throughput import table_peak  # pylint: disable=g-import-not-at-top

    peak = table_peak(device.device_kind, "float32") or float("nan")
    source = f"spec sheet {device.device_kind}"
  print(
    f"device: {device.device_kind} x1 ({device.platform}); peak {peak / 1e9:.1f} GFLOP/s "
    f"({source})",
    flush=True,
  )
  if args.peer:
    r = peer_compare(args.steps, args.rounds, args.gin_param, peak)
    peak = max(peak, matmul_rate(1024, 1024, 1024, repeats=10, chain=8))
    for side in ("ours", "peer"):
      r[side]["mfu"] *= r["peak_flops"] / peak
    print(f"peak used for MFU: {peak / 1e9:.1f} GFLOP/s ({source})")
    for side in ("ours", "peer"):
      print(
        f"{side:5s} step {r[side]['step_s_median'] * 1e3:7.1f} ms  "
        f"{r[side]['tokens_per_s']:7.0f} tok/s  MFU {100 * r[side]['mfu']:5.1f}%"
      )
    print(f"ratio ours/peer (tokens/s, medians of {r['steps_each']} steps each): {r['ratio']:.3f}")
    if args.out:
      Path(args.out).write_text(json.dumps(r, indent=2) + "\n")
    return 0
  results = []
  for name in args.configs:
    r = bench(name, args.steps, args.gin_param, peak, not args.no_breakdown, args.profile_dir)
    results.append(r)
    print(
      f"{name}: step {r['step_s_median'] * 1e3:.1f}ms, compile {r['compile_s']:.1f}s", flush=True
    )
    if device.platform == "cpu":
      # Re-measured after each model: the best figure of the session is the ceiling.
      peak = max(
        peak, r["mlp_shape_peak_flops"], matmul_rate(1024, 1024, 1024, repeats=10, chain=8)
      )
  for r in results:
    r["mfu"] = r["achieved_tflops"] * 1e12 / peak
  print(f"peak used for MFU: {peak / 1e9:.1f} GFLOP/s ({source})")
  for r in results:
    line = (
      f"{r['config']:12s} params {r['params'] / 1e6:6.2f}M  batch {r['batch']}x{r['seq_len']}  "
      f"compile {r['compile_s']:6.1f}s  step {r['step_s_median'] * 1e3:8.1f}ms  "
      f"{r['tokens_per_s']:9.0f} tok/s  {r['achieved_tflops'] * 1e3:7.1f} GFLOP/s  "
      f"MFU {100 * r['mfu']:5.1f}%  (XLA/model FLOPs "
      f"{r['xla_flops_per_step'] / r['model_flops_per_step']:.2f})"
    )
    line += f"\n{'':12s} MLP-shape matmul {r['mlp_shape_peak_flops'] / 1e9:.1f} GFLOP/s"
    if "forward_s" in r:
      line += (
        f"  forward {r['forward_s'] * 1e3:.1f}ms  fwd+bwd "
        f"{r['forward_backward_s'] * 1e3:.1f}ms  update {r['update_s'] * 1e3:.1f}ms"
      )
    print(line, flush=True)
  if args.out:
    Path(args.out).write_text(
      json.dumps(
        {
          "peak_flops": peak,
          "peak_source": source,
          "device": device.device_kind,
          "results": results,
        },
        indent=2,
      )
      + "\n"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
