"""Attention memory and time against sequence length: einsum (dense) against blockwise.

    .venv/bin/python bench/attention_memory.py [--lengths 512 1024 2048 4096 8192]
        [--impls einsum blockwise] [--repeats 3] [--plot bench/attention_memory.png]

For a model of tiny_gemma2's width (gin/models/tiny_gemma2.gin: d=128, 4 heads,
2 kv heads, head_dim 32, soft-caps, pre+post norms) with its local/global
pattern, at batch 1, it compiles the forward + backward (gradients of the mean
token loss) and reports XLA's temporary memory (`compiled.memory_analysis()`)
and the median step time. Blockwise memory must grow about linearly: at most
2.3x per doubling of T.

It also times one attention call (forward + backward) of each layer kind alone,
so that a local layer's time can be seen to follow the window, not T: per token
it stays flat for blockwise while a global layer's grows with T.

Every figure is from this process, on this machine; medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

GIB = 2.0**30
# Past this, running the dense step would not fit this machine's memory: compile only.
RUN_LIMIT_BYTES = 10 * GIB


def model_config(length: int, impl: str, block: int, window: int | None):
  import gin  # pylint: disable=g-import-not-at-top
  from core.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from launch import gin_config  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  gin_config.parse(["gin/models/tiny_gemma2.gin"], [], finalize=False)
  config = gin_config.build(ModelConfig)
  return config.replace(
    max_seq_len=length,
    attention_impl=impl,
    attention_block_q=block,
    attention_block_k=block,
    window=window or config.window,
  )


def _median_time(fn, args, repeats: int) -> float:
  from train_throughput import _median_time as median_time  # pylint: disable=g-import-not-at-top

  jax.block_until_ready(fn(*args))  # compile and warm up outside the timing
  return median_time(fn, args, repeats)


def model_step(config, length: int, repeats: int) -> dict:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from core.model.transformer import Transformer  # pylint: disable=g-import-not-at-top

  model = Transformer(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (1, length), 0, config.vocab_size)

  def loss(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

  step = jax.jit(jax.value_and_grad(loss))
  t = time.perf_counter()
  compiled = step.lower(params, tokens).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  out = {
    "temp_bytes": mem.temp_size_in_bytes,
    "argument_bytes": mem.argument_size_in_bytes,
    "compile_s": compile_s,
  }
  if mem.temp_size_in_bytes < RUN_LIMIT_BYTES:
    out["step_s"] = _median_time(compiled, (params, tokens), repeats)
  return out


def layer_time(config, kind: str, length: int, repeats: int) -> float:
  """Forward + backward of one attention call of `kind`, without the rest of the model."""
  from core.model import attention_impls  # pylint: disable=g-import-not-at-top
  from core.model.attention import attend  # pylint: disable=g-import-not-at-top
  from core.model.masking import training_spec  # pylint: disable=g-import-not-at-top

  ks = jax.random.split(jax.random.key(0), 3)
  c = config
  q = jax.random.normal(ks[0], (1, length, c.num_heads, c.head_dim))
  k = jax.random.normal(ks[1], (1, length, c.num_kv_heads, c.head_dim))
  v = jax.random.normal(ks[2], (1, length, c.num_kv_heads, c.head_dim))
  spec = training_spec(length, None)
  impl = attention_impls.choose(c, jax.default_backend(), length, packed=False)
  block_q, block_k = attention_impls.block_sizes(c, jax.default_backend())
  window = c.window if kind == "local" else None

  def loss(q, k, v):
    return jnp.sum(
      attend(
        q,
        k,
        v,
        spec,
        scale=c.query_scale,
        attn_softcap=c.attn_softcap,
        impl=impl,
        window=window,
        block_q=block_q,
        block_k=block_k,
      )
    )

  return _median_time(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, k, v), repeats)


def plot(rows, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  for impl in sorted({r["impl"] for r in rows}):
    mine = [r for r in rows if r["impl"] == impl]
    a.plot([r["length"] for r in mine], [r["temp_bytes"] / GIB for r in mine], "o-", label=impl)
    timed = [r for r in mine if "local_us_per_token" in r]
    b.plot(
      [r["length"] for r in timed],
      [r["local_us_per_token"] for r in timed],
      "o-",
      label=f"{impl} local",
    )
    b.plot(
      [r["length"] for r in timed],
      [r["global_us_per_token"] for r in timed],
      "s--",
      label=f"{impl} global",
    )
  for ax in (a, b):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.legend()
  a.set_ylabel("XLA temporary memory, fwd+bwd (GiB)")
  b.set_ylabel("attention fwd+bwd per token (us)")
  fig.suptitle("tiny_gemma2 width, batch 1: dense einsum vs blockwise attention")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
  parser.add_argument("--impls", nargs="+", default=["einsum", "blockwise"])
  parser.add_argument(
    "--block", type=int, default=None, help="block size of blockwise (default: the platform's)"
  )
  parser.add_argument(
    "--window", type=int, default=None, help="local window (default: tiny_gemma2's own)"
  )
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--plot", default=None)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform})", flush=True)
  rows = []
  for impl in args.impls:
    prev = None
    for length in args.lengths:
      config = model_config(length, impl, args.block, args.window)
      r = {
        "impl": impl,
        "length": length,
        "window": config.window,
        **model_step(config, length, args.repeats),
      }
      if "step_s" in r:
        for kind in ("local", "global"):
          r[f"{kind}_us_per_token"] = layer_time(config, kind, length, args.repeats) / length * 1e6
      r["growth"] = r["temp_bytes"] / prev if prev else None
      prev = r["temp_bytes"]
      rows.append(r)
      step = f"{r['step_s'] * 1e3:9.1f} ms" if "step_s" in r else "  (not run)"
      per_tok = (
        f"local {r['local_us_per_token']:7.2f} us/tok  global "
        f"{r['global_us_per_token']:7.2f} us/tok"
        if "step_s" in r
        else ""
      )
      growth = f"x{r['growth']:.2f}" if r["growth"] else "     "
      print(
        f"{impl:10s} T={length:5d}  temp {r['temp_bytes'] / GIB:8.3f} GiB {growth:>6s}  "
        f"step {step}  {per_tok}  compile {r['compile_s']:.1f}s",
        flush=True,
      )
  if args.plot:
    plot(rows, args.plot)
    print(f"plot: {args.plot}")
  if args.out:
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
