"""Normalizers: RMSNorm (Gemma's (1 + scale) and LLaMA's scale forms), LayerNorm, none."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from core.model.config import ModelConfig
from core.model.sharding import param


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, or * (1 + scale) as in Gemma (scale then starts at 0).

  Statistics are taken in float32 whatever the compute dtype: bf16 sums of
  squares lose the precision the normalizer exists to provide.
  """

  def __init__(self, dim: int, *, eps: float, plus_one: bool, param_dtype, rngs: nnx.Rngs):
    init = nnx.initializers.zeros if plus_one else nnx.initializers.ones
    self.scale = param(init, rngs.params(), (dim,), param_dtype, ("norm",))
    self.eps = eps
    self.plus_one = plus_one

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    y = y * (1.0 + scale if self.plus_one else scale)
    return y.astype(x.dtype)


class LayerNorm(nnx.Module):
  """Mean-centred normalization with scale and bias (the original Transformer's)."""

  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
    self.scale = param(nnx.initializers.ones, rngs.params(), (dim,), param_dtype, ("norm",))
    self.bias = param(nnx.initializers.zeros, rngs.params(), (dim,), param_dtype, ("norm",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class Identity(nnx.Module):
  """norm='none': no parameters, no change."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x


def make_norm(config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The normalizer config.norm names, over the model width (embed_dim)."""
  dtype = jnp.dtype(config.param_dtype)
  if config.norm == "rmsnorm":
    return RMSNorm(
      config.embed_dim,
      eps=config.norm_eps,
      plus_one=config.rms_scale_plus_one,
      param_dtype=dtype,
      rngs=rngs,
    )
  if config.norm == "layernorm":
    return LayerNorm(config.embed_dim, eps=config.norm_eps, param_dtype=dtype, rngs=rngs)
  return Identity()
