"""The train state and the jitted train step: loss, gradients, accumulation, update.

The state is a plain pytree (`TrainState`): the step, the parameters as a pure
dict (the `nnx.to_pure_dict` of the model's Params), the optax state and an RNG
key. The model is rebuilt inside the traced function with `nnx.merge(graphdef,
params)`, which costs nothing at run time, and the step is one `jax.jit` with
explicit in/out shardings and the state donated, so parameters and optimizer
state are updated in place, each device holding only its shard.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from core.model.config import ModelConfig
from core.model.sharding import activation_sharding
from core.model.transformer import Transformer
from core.train import partition
from core.train.host_input import process_rows
from core.train.loss import chunked_log_z_and_target, log_z_and_target, loss_moments, loss_sums
from core.train.optimizer import Scheduled

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
BATCH_DTYPES = {
  "inputs": jnp.int32,
  "targets": jnp.int32,
  "segment_ids": jnp.int32,
  "positions": jnp.int32,
  "loss_mask": jnp.float32,
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied
  params: Any  # pure dict of arrays, as nnx.to_pure_dict(nnx.state(model, nnx.Param))
  opt_state: Any  # the optax state
  rng: jax.Array  # uint32 key data; per-step keys are fold_in(rng, step)


@dataclasses.dataclass
class StepBuilder:
  """Everything the step depends on; `build()` returns the jitted step.

  The step maps (state, batch, inputs) to (state, metrics). Its training loss is
  `loss(...)`, the one hook a builder of another objective overrides
  (core.train.distill); everything else (accumulation, the update, sharding,
  the held-out evaluation) is this class's, whatever the loss.

  `inputs` is `step_inputs()`: arrays the loss reads besides the state and the
  batch (a distillation teacher's weights; none here). They enter the step as an
  argument because jit bakes closed-over arrays into the program as constants:
  replicated on every device and as large as the arrays themselves.

  Attributes:
    config: the model.
    optimizer: the optax transformation of the recipe, built before the builder
      from `param_axes(config)` (make_builder).
    mesh, rules: where parameters, batches and activation constraints live.
    grad_accum_steps: micro-batches per update; the gradient equals the
      full-batch gradient (token-weighted), only memory changes.
    z_loss: weight of the log(Z)^2 auxiliary loss (PaLM uses 1e-4); 0 = off.
    loss_vocab_chunk: > 0 computes the loss vocabulary-tiled, this many
      vocabulary rows at a time (core.train.loss.chunked_cross_entropy), so the
      (B, T, V) float32 logits never exist; 0 = from whole logits.
  """

  config: ModelConfig
  optimizer: optax.GradientTransformation
  mesh: Mesh
  rules: Mapping[str, Any]
  grad_accum_steps: int = 1
  z_loss: float = 0.0
  loss_vocab_chunk: int = 0

  def __post_init__(self):
    if self.loss_vocab_chunk < 0:
      raise ValueError(f"loss_vocab_chunk must be >= 0 (0 = off), got {self.loss_vocab_chunk}")
    self.graphdef, param_state = _abstract_params(self.config)
    self.param_specs = partition.param_specs(param_state, self.mesh, self.rules)

  @property
  def schedule(self) -> optax.Schedule | None:
    """The learning rate by step, for the logs: the recipe's (optimizer.Scheduled), else None."""
    return self.optimizer.schedule if isinstance(self.optimizer, Scheduled) else None

  # -- init -------------------------------------------------------------------------

  def _init(self, rng: jax.Array) -> TrainState:
    init_key, state_key = jax.random.split(rng)
    model = Transformer(self.config, rngs=nnx.Rngs(params=init_key))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=self.optimizer.init(params),
      rng=jax.random.key_data(state_key),
    )

  def abstract_state(self) -> TrainState:
    """Shapes and dtypes of the state, each leaf with its NamedSharding."""
    shapes = jax.eval_shape(self._init, jax.random.key(0))
    shardings = self.state_shardings(shapes)
    return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )

  def state_shardings(self, shapes: TrainState | None = None) -> TrainState:
    shapes = shapes or jax.eval_shape(self._init, jax.random.key(0))
    specs = TrainState(
      step=PartitionSpec(),
      params=self.param_specs,
      opt_state=opt_state_specs(shapes.opt_state, self.param_specs, shapes.params),
      rng=PartitionSpec(),
    )
    return partition.named(self.mesh, specs)

  def init(self, seed: int) -> TrainState:
    """A fresh state, created directly in its shards (no full copy on any device).

    Random bits do not depend on the sharding (jax_threefry_partitionable), so
    every mesh starts from the same weights.
    """
    shardings = self.state_shardings()
    return jax.jit(self._init, out_shardings=shardings)(jax.random.key(seed))

  # -- step -------------------------------------------------------------------------

  def batch_sharding(self, shape) -> NamedSharding:
    return NamedSharding(self.mesh, partition.batch_spec(self.mesh, self.rules, shape))

  def step_inputs(self) -> Any:
    """The step's third argument (a pytree of arrays; empty here)."""
    return ()

  def step_input_shardings(self) -> Any:
    """NamedShardings of step_inputs(), leaf for leaf."""
    return ()

  def _log_z_and_target(self, params, batch):
    """Per-token (log Z, target logit), from whole logits or vocabulary-tiled."""
    model = nnx.merge(self.graphdef, params)
    if self.loss_vocab_chunk:
      hidden = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
      return chunked_log_z_and_target(
        hidden,
        model.embedder.output_rows(),
        batch["targets"],
        chunk=self.loss_vocab_chunk,
        final_softcap=self.config.final_softcap,
      )
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    return log_z_and_target(logits, batch["targets"])

  def loss(self, params, batch, inputs) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The training loss: (loss sum, log(Z)^2 sum, tokens) of `batch`.

    Sums, so micro-batches and shards add up; the step divides once by the
    tokens and adds z_loss times the log(Z)^2 term. The next-token loss here; a
    builder of another objective overrides this alone, reading what else it
    needs from `inputs` (its step_inputs()).
    """
    del inputs  # the plain next-token loss reads nothing else
    return loss_sums(*self._log_z_and_target(params, batch), batch["loss_mask"])

  def _objective(self, params, batch, inputs):
    loss_sum, z_sum, tokens = self.loss(params, batch, inputs)
    return loss_sum + self.z_loss * z_sum, (loss_sum, z_sum, tokens)

  def _grads(self, params, batch, inputs):
    grad_fn = jax.grad(self._objective, has_aux=True)
    a = self.grad_accum_steps
    if a == 1:
      return grad_fn(params, batch, inputs)

    # Micro-batch i takes rows i, i + a, ...: each data shard keeps its own rows,
    # so splitting moves no data between devices.
    def split(x):
      b = x.shape[0]
      if b % a:
        raise ValueError(f"batch size {b} is not a multiple of grad_accum_steps {a}")
      return x.reshape(b // a, a, *x.shape[1:]).swapaxes(0, 1)

    micro = jax.tree.map(split, batch)

    def body(carry, mb):
      g_acc, aux_acc = carry
      g, aux = grad_fn(params, mb, inputs)
      return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, aux_acc, aux)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    zero_aux = (jnp.zeros((), jnp.float32),) * 3
    (grads, aux), _ = jax.lax.scan(body, (zeros, zero_aux), micro)
    return grads, aux

  def _step(self, state: TrainState, batch: Mapping[str, jax.Array], inputs: Any):
    with activation_sharding(self.mesh, self.rules):
      grads, (loss_sum, z_sum, tokens) = self._grads(state.params, batch, inputs)
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite step leaves the state as it was, so whatever the host does
    # next (stop, save) it holds the last good parameters.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(ok, new, old)
    new_state = TrainState(
      step=state.step + ok.astype(jnp.int32),
      params=jax.tree.map(keep, params, state.params),
      opt_state=jax.tree.map(keep, opt_state, state.opt_state),
      rng=state.rng,
    )
    metrics = {
      "loss": loss,
      "z_loss": z_sum / denom,
      "grad_norm": grad_norm,
      "param_norm": optax.tree.norm(params),
      "tokens": tokens,
      "finite": ok,
    }
    return new_state, metrics

  def build(self, batch_shape) -> Callable[[TrainState, Mapping[str, jax.Array], Any], Any]:
    """The jitted step; call it as step(state, batch, builder.step_inputs())."""
    state_sh = self.state_shardings()
    batch_sh = {k: self.batch_sharding(batch_shape) for k in BATCH_KEYS}
    replicated = NamedSharding(self.mesh, PartitionSpec())
    return jax.jit(
      self._step,
      in_shardings=(state_sh, batch_sh, self.step_input_shardings()),
      out_shardings=(state_sh, replicated),
      donate_argnums=(0,),
    )

  def _heldout(self, params, batch):
    """(loss sum, sum of squared token losses, tokens) of the plain next-token loss.

    What every step builder evaluates, whatever its training loss (distillation
    trains on a teacher's distribution but is evaluated like any other run).
    """
    return loss_moments(*self._log_z_and_target(params, batch), batch["loss_mask"])

  def build_eval(self, batch_shape) -> Callable[[Any, Mapping[str, jax.Array]], Any]:
    """(params, batch) -> (loss sum, squared-loss sum, tokens): held-out loss, no gradient."""

    def evaluate(params, batch):
      with activation_sharding(self.mesh, self.rules):
        return self._heldout(params, batch)

    param_sh = partition.named(self.mesh, self.param_specs)
    batch_sh = {k: self.batch_sharding(batch_shape) for k in BATCH_KEYS}
    replicated = NamedSharding(self.mesh, PartitionSpec())
    return jax.jit(evaluate, in_shardings=(param_sh, batch_sh), out_shardings=replicated)


def _abstract_params(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and its parameters as shapes (nothing allocated)."""
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  return nnx.split(abstract, nnx.Param)


def param_axes(config: ModelConfig) -> dict:
  """The parameters' logical axes: a pure dict mirroring them, each leaf a tuple of axis names.

  What an optimizer recipe reads (core.train.optimizer: its weight-decay mask),
  known from the abstract model, so the optimizer exists before the StepBuilder.
  """
  _, param_state = _abstract_params(config)
  variables = partition.variables_by_path(param_state)
  return jax.tree_util.tree_map_with_path(
    lambda p, _: tuple(variables[jax.tree_util.keystr(p)].get_metadata().get("logical_axes") or ()),
    nnx.to_pure_dict(param_state),
  )


def opt_state_specs(opt_shapes, param_specs, param_shapes) -> Any:
  """Optimizer-state leaves shaped like a parameter are sharded like it (ZeRO-3); others replicate.

  Optax states hold trees mirroring the parameters (Adam's mu and nu), so a leaf
  whose path ends with a parameter's path and has its shape is that
  parameter's moment. Factored statistics (Adafactor's row/column vectors) and
  counters are small and replicated.
  """
  flat_specs = {
    jax.tree_util.keystr(p): s
    for p, s in jax.tree_util.tree_flatten_with_path(
      param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )[0]
  }
  flat_shapes = {
    jax.tree_util.keystr(p): x.shape
    for p, x in jax.tree_util.tree_flatten_with_path(param_shapes)[0]
  }
  # Longest first, so a parameter path that ends another one's never shadows it.
  keys = sorted(flat_specs, key=len, reverse=True)

  def one(path, leaf):
    name = jax.tree_util.keystr(path)
    for key in keys:
      if name.endswith(key) and tuple(leaf.shape) == tuple(flat_shapes[key]):
        return flat_specs[key]
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(one, opt_shapes)


def abstract_batch(builder: StepBuilder, shape: tuple[int, int]) -> dict:
  """The batch as ShapeDtypeStructs with their shardings: what the step is compiled for."""
  sharding = builder.batch_sharding(shape)
  return {k: jax.ShapeDtypeStruct(shape, BATCH_DTYPES[k], sharding=sharding) for k in BATCH_KEYS}


def make_builder(
  model: ModelConfig,
  optimizer: Callable[..., optax.GradientTransformation],
  mesh: Mesh,
  rules: Mapping[str, Any],
  *,
  num_steps: int,
  grad_accum_steps: int = 1,
  z_loss: float = 0.0,
  loss_vocab_chunk: int = 0,
  step_builder: Callable[..., StepBuilder] | None = None,
) -> StepBuilder:
  """The StepBuilder of a run, with the optimizer of its recipe.

  One place for what a run steps with, so that `ablax plan` compiles exactly
  the step that `train` runs. The recipe is called with the parameters' logical
  axes (from the abstract model) and the run length, then the builder is made
  with the optimizer it will always step with.
  """
  tx = optimizer(param_axes=param_axes(model), total_steps=num_steps)
  return (step_builder or StepBuilder)(
    model,
    tx,
    mesh,
    rules,
    grad_accum_steps=grad_accum_steps,
    z_loss=z_loss,
    loss_vocab_chunk=loss_vocab_chunk,
  )


def device_batch(
  batch: Mapping[str, Any],
  sharding_for: Callable[[tuple], NamedSharding],
  global_rows: int | None = None,
) -> dict:
  """A global jax.Array per field, assembled from what this process holds.

  `batch` is this process's rows of a `global_rows`-row batch
  (core.train.host_input.HostShardedBatches), or, with global_rows None, the
  whole global batch, of which the process keeps its own rows.
  """
  out = {}
  for key in BATCH_KEYS:
    host = batch[key]
    shape = (global_rows or host.shape[0],) + tuple(host.shape[1:])
    sharding = sharding_for(shape)
    if global_rows is None:
      lo, hi = process_rows(sharding, shape)
      host = host[lo:hi]
    out[key] = jax.make_array_from_process_local_data(sharding, host, shape)
  return out
