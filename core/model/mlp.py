"""Feed-forward blocks: gated (GeGLU, SwiGLU, ReGLU) and ungated (ReLU, GELU, squared ReLU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from core.model.config import ACTIVATIONS, ModelConfig
from core.model.sharding import constrain, param

# The one registry of activation functions; ModelConfig.ACTIVATIONS names them.
ACTIVATION_FNS = {
  # tanh approximation: what Gemma's reference and checkpoints use.
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "silu": jax.nn.silu,
  "relu": jax.nn.relu,
  "squared_relu": lambda x: jnp.square(jax.nn.relu(x)),
}


class MLP(nnx.Module):
  """down(act(x W_gate) * x W_up) when gated, else down(act(x W_up))."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    dtype = jnp.dtype(c.param_dtype)
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    fn_name, self.gated = ACTIVATIONS[c.activation]
    self.act = ACTIVATION_FNS[fn_name]
    f = c.mlp_dim
    if self.gated:
      self.gate = param(init, rngs.params(), (c.embed_dim, f), dtype, ("embed", "mlp"))
    self.up = param(init, rngs.params(), (c.embed_dim, f), dtype, ("embed", "mlp"))
    self.down = param(init, rngs.params(), (f, c.embed_dim), dtype, ("mlp", "embed"))
    self.compute_dtype = jnp.dtype(c.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    cd = self.compute_dtype
    up = jnp.einsum("btd,df->btf", x, self.up[...].astype(cd))
    if self.gated:
      gate = jnp.einsum("btd,df->btf", x, self.gate[...].astype(cd))
      h = self.act(gate) * up
    else:
      h = self.act(up)
    h = constrain(h, ("batch", "length", "act_mlp"))
    return jnp.einsum("btf,fd->btd", h, self.down[...].astype(cd))
