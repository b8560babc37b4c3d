"""Attention implementations: what each can serve, and what 'auto' picks where.

One table of facts, used by config validation (an implementation that cannot
serve a variant is an error naming the variant and an alternative), by the
forward pass (which implementation a layer kind runs), and by the run record
(which one each layer kind actually used).

- 'einsum': plain XLA over the whole (T, S) grid; the reference, serves everything.
- 'blockwise': flash-style pure JAX (core/model/blockwise.py); serves everything
  on every platform, memory linear in T, local layers skip out-of-window blocks.
- 'splash': TPU Pallas splash attention; local masks, segment ids, GQA, soft-cap.
- 'cudnn': cuDNN flash attention through jax.nn.dot_product_attention; GPU only,
  bf16/fp16, no soft-cap.
- 'dot_product_attention': jax.nn.dot_product_attention letting jax choose (XLA
  on CPU and TPU, cuDNN on GPU when it can); no soft-cap.
- 'auto': splash on TPU; cuDNN on GPU where the variant allows, else blockwise;
  on CPU einsum below CPU_BLOCKWISE_FROM tokens and blockwise from there.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import TYPE_CHECKING, Iterator

import jax

if TYPE_CHECKING:
  from core.model.config import ModelConfig

IMPLS = ("auto", "einsum", "blockwise", "splash", "cudnn", "dot_product_attention")

# Measured by bench/attention_memory.py (bench/README.md): on 2 CPU cores the two
# are even at 128 tokens and blockwise is faster from 256 on; the einsum
# reference keeps the shortest sequences.
CPU_BLOCKWISE_FROM = 256

# Block sizes where ModelConfig leaves them None. On CPU small tiles stay in cache
# and let causal and window skipping drop more work (bench/README.md: 64 beat
# 128, and 128 beat 512, in the cpu_bench step and at 2048-8192 tokens);
# splash's and MaxText's TPU default is 512.
DEFAULT_BLOCK = {"cpu": 64, "gpu": 512, "tpu": 512}

# TPU vector lanes: splash tiles the head and sequence dimensions by 128.
_LANES = 128
CUDNN_MAX_HEAD_DIM = 128  # the widest head every cuDNN 9 flash kernel (fwd + bwd) serves
_PLATFORM_OF = {"splash": "tpu", "cudnn": "gpu"}


_TARGET = contextvars.ContextVar("ablax_attention_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
  """Choose implementations for `platform` ('cpu', 'gpu', 'tpu') while tracing inside.

  For compiling ahead of time for hardware that is not the host's: tracing then
  happens on the host, whose jax.default_backend() is not the target.
  """
  if platform not in DEFAULT_BLOCK:
    raise ValueError(f"platform must be one of {tuple(DEFAULT_BLOCK)}, got {platform!r}")
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


def current_platform() -> str:
  """The platform attention is traced for: target_platform's, else jax's default backend."""
  return _TARGET.get() or jax.default_backend()


def block_sizes(config: ModelConfig, platform: str) -> tuple[int, int]:
  """(block_q, block_k): the config's, or this platform's default where it leaves them None."""
  default = DEFAULT_BLOCK.get(platform, 512)
  return (config.attention_block_q or default, config.attention_block_k or default)


def unsupported(
  impl: str,
  *,
  head_dim: int,
  dtype: str,
  attn_softcap: float | None,
  block_q: int | None,
  block_k: int | None,
) -> str | None:
  """Why `impl` cannot serve this variant, or None. Platform-independent facts only."""
  if impl in ("cudnn", "dot_product_attention") and attn_softcap is not None:
    return "attention soft-capping (attn_softcap) is not in jax.nn.dot_product_attention"
  if impl == "cudnn":
    if dtype not in ("bfloat16", "float16"):
      return f"cuDNN flash attention takes bfloat16 or float16, not dtype={dtype!r}"
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
      return (
        f"cuDNN flash attention needs head_dim a multiple of 8 up to "
        f"{CUDNN_MAX_HEAD_DIM}, got {head_dim}"
      )
  if impl == "splash":
    if head_dim % _LANES:
      return f"splash attention needs head_dim a multiple of {_LANES}, got {head_dim}"
    if (block_q or _LANES) % _LANES or (block_k or _LANES) % _LANES:
      return (
        f"splash attention needs block sizes that are multiples of {_LANES}, "
        f"got attention_block_q={block_q}, attention_block_k={block_k}"
      )
  return None


def check_platform(impl: str, platform: str) -> None:
  """Raises ValueError when `impl` needs another platform than `platform`."""
  need = _PLATFORM_OF.get(impl)
  if need is not None and platform != need:
    raise ValueError(
      f"attention_impl={impl!r} runs on {need.upper()} only, and this run is on "
      f"{platform.upper()}; use attention_impl='auto' or 'blockwise'"
    )


def choose(
  config: ModelConfig, platform: str, length: int, packed: bool, decoding: bool = False
) -> str:
  """The implementation attention layers run for `length` tokens on `platform`.

  `packed`: the rows carry segment ids (several documents, or padding).
  Decoding a few tokens against a cache is a matrix-vector product that flash
  kernels do not target: there einsum stays einsum and every other choice runs
  blockwise, which keeps memory linear in the cache length.
  """
  impl = config.attention_impl
  if decoding:
    if impl == "einsum" or (impl == "auto" and platform == "cpu" and length < CPU_BLOCKWISE_FROM):
      return "einsum"
    return "blockwise"
  if impl != "auto":
    check_platform(impl, platform)
    return impl
  block_q, block_k = block_sizes(config, platform)
  facts = dict(
    head_dim=config.head_dim,
    dtype=config.dtype,
    attn_softcap=config.attn_softcap,
    block_q=block_q,
    block_k=block_k,
  )
  if platform == "tpu":
    if unsupported("splash", **facts) is None and length % max(block_q, block_k) == 0:
      return "splash"
    return "blockwise"
  if platform == "gpu":
    # cuDNN with packed rows would need a dense (T, S) mask, which is what we avoid.
    if unsupported("cudnn", **facts) is None and not packed:
      return "cudnn"
    return "blockwise"
  return "einsum" if length < CPU_BLOCKWISE_FROM else "blockwise"


def used_by_kind(config: ModelConfig, platform: str, length: int, packed: bool) -> dict[str, str]:
  """{layer kind: implementation} for the run record."""
  impl = choose(config, platform, length, packed)
  return {kind: impl for kind in sorted(set(config.layer_kinds))}
