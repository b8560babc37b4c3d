"""Trainer pieces on literal inputs: mesh sizes, partition rules, optimizer masks and schedules, loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from core.train import mesh as meshlib
from core.train import optimizer, partition
from core.train.loss import cross_entropy
from core.train.step import StepBuilder, param_axes
from tests.tiny_model import tiny_config

TINY = tiny_config(
  vocab_size=64,
  embed_dim=16,
  mlp_dim=32,
  max_seq_len=16,
  activation="swiglu",
  tie_embeddings=False,
  scale_embeddings=False,
)


def test_mesh_rest_axis_and_errors():
  assert meshlib.MeshConfig(2, -1, 2).shape(8) == (2, 2, 2)
  assert meshlib.MeshConfig().shape(8) == (1, 8, 1)
  with pytest.raises(meshlib.MeshError, match="at most one"):
    meshlib.MeshConfig(-1, -1, 1).shape(8)
  with pytest.raises(meshlib.MeshError, match="does not divide"):
    meshlib.MeshConfig(3, -1, 1).shape(8)
  with pytest.raises(meshlib.MeshError, match="has 4 devices"):
    meshlib.MeshConfig(2, 2, 1).shape(8)
  mesh = meshlib.make_mesh(meshlib.MeshConfig(2, 2, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_fit_spec_replicates_indivisible_dims():
  mesh = meshlib.make_mesh(meshlib.MeshConfig(2, 2, 2))
  assert partition.fit_spec(P("fsdp", "tensor"), (4, 3), mesh) == P("fsdp", None)
  assert partition.batch_spec(mesh, partition.DEFAULT_RULES, (8, 16)) == P(("data", "fsdp"), None)
  assert partition.batch_spec(mesh, partition.DEFAULT_RULES, (6, 16)) == P(None, None)


def test_every_parameter_gets_the_configured_spec():
  mesh = meshlib.make_mesh(meshlib.MeshConfig(2, 2, 2))
  rules = partition.merged_rules({"vocab": None})
  b = StepBuilder(TINY, optax.identity(), mesh, rules)
  attn = b.param_specs["blocks"][0]["attn"]
  assert attn["q"] == P("fsdp", "tensor", None)
  assert attn["k"] == P("fsdp", "tensor", None)
  assert attn["o"] == P("tensor", None, "fsdp")
  assert b.param_specs["blocks"][0]["mlp"]["up"] == P("fsdp", "tensor")
  assert b.param_specs["blocks"][0]["mlp"]["down"] == P("tensor", "fsdp")
  assert b.param_specs["blocks"][0]["attn_norm"]["scale"] == P(None)
  assert b.param_specs["embedder"]["embedding"] == P(None, "fsdp")  # override applied


def test_optimizer_state_is_sharded_like_the_parameters():
  mesh = meshlib.make_mesh(meshlib.MeshConfig(2, 2, 2))
  tx = optimizer.llama_adamw(param_axes=param_axes(TINY), total_steps=10)
  b = StepBuilder(TINY, tx, mesh, partition.merged_rules())
  state = b.init(0)
  q = state.params["blocks"][1]["attn"]["q"]
  assert q.sharding.spec == P("fsdp", "tensor", None)
  adam = state.opt_state[1][0]
  assert adam.mu["blocks"][1]["attn"]["q"].sharding.spec == P("fsdp", "tensor", None)
  assert adam.nu["embedder"]["unembed"].sharding.spec == P("fsdp", "tensor")
  # Each device holds a quarter of q: fsdp x tensor = 4 shards.
  assert q.addressable_shards[0].data.size * 4 == q.size


def test_decay_mask_spares_norms_and_embeddings():
  mask = optimizer.decay_mask(param_axes(TINY))
  assert mask["blocks"][0]["attn"]["q"] and mask["blocks"][0]["mlp"]["down"]
  assert not mask["blocks"][0]["attn_norm"]["scale"] and not mask["final_norm"]["scale"]
  assert not mask["embedder"]["embedding"] and not mask["embedder"]["unembed"]
  assert optimizer.decay_mask(param_axes(TINY), decay_embeddings=True)["embedder"]["embedding"]


def test_llama_schedule_warmup_then_cosine_to_ten_percent():
  s = optimizer.warmup_cosine(3e-4, warmup_steps=100, total_steps=1000)
  assert float(s(0)) == 0.0
  assert float(s(50)) == pytest.approx(1.5e-4)
  assert float(s(100)) == pytest.approx(3e-4)
  assert float(s(1000)) == pytest.approx(3e-5)
  assert 3e-5 < float(s(550)) < 3e-4


@pytest.mark.parametrize("recipe", [optimizer.llama_adamw, optimizer.adafactor, optimizer.sgd])
def test_recipes_update_parameters(recipe):
  params = {"w": jnp.ones((4, 4)), "scale": jnp.ones((4,))}
  axes = {"w": ("embed", "mlp"), "scale": ("norm",)}
  tx = recipe(param_axes=axes, total_steps=10)
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert float(params["w"][0, 0]) < 1.0


def test_llama_adamw_decays_matrices_not_norms():
  params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  axes = {"w": ("embed", "mlp"), "scale": ("norm",)}
  tx = optimizer.llama_adamw(
    param_axes=axes, total_steps=10, warmup_steps=1, peak_lr=1.0, weight_decay=0.5
  )
  zero = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  tx.update(zero, state, params)
  updates, _ = tx.update(zero, tx.update(zero, state, params)[1], params)
  assert float(updates["w"][0, 0]) < 0.0  # decay only
  assert float(updates["scale"][0]) == 0.0


def test_cross_entropy_masks_and_counts():
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
  targets = jnp.array([[0, 1]])
  loss_sum, z_sum, n = cross_entropy(logits, targets, jnp.array([[1.0, 0.0]]))
  assert float(loss_sum) == pytest.approx(np.log(2.0), rel=1e-6)
  assert float(n) == 1.0 and float(z_sum) == pytest.approx(0.0, abs=1e-6)


def test_gradient_accumulation_equals_full_batch():
  mesh = meshlib.make_mesh(meshlib.MeshConfig(1, 1, 1), jax.devices()[:1])
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 64, (4, 9)).astype(np.int32)
  mask = np.ones((4, 8), np.float32)
  mask[1, 3:] = 0  # unequal token counts per micro-batch
  batch = {
    "inputs": toks[:, :-1],
    "targets": toks[:, 1:],
    "loss_mask": mask,
    "segment_ids": np.ones((4, 8), np.int32),
    "positions": np.tile(np.arange(8, dtype=np.int32), (4, 1)),
  }
  grads = {}
  for a in (1, 2):
    b = StepBuilder(TINY, optax.identity(), mesh, {}, grad_accum_steps=a)
    params = b.init(0).params
    g, (loss_sum, _, n) = jax.jit(b._grads)(params, batch, b.step_inputs())
    grads[a] = jax.tree.map(lambda x, n=n: x / n, g)
  for x, y in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[2])):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_mixed_precision_and_remat_step_matches_float32_loosely():
  mesh = meshlib.make_mesh(meshlib.MeshConfig(1, 1, 1), jax.devices()[:1])
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 64, (2, 9)).astype(np.int32)
  batch = {
    "inputs": toks[:, :-1],
    "targets": toks[:, 1:],
    "loss_mask": np.ones((2, 8), np.float32),
    "segment_ids": np.ones((2, 8), np.int32),
    "positions": np.tile(np.arange(8, dtype=np.int32), (2, 1)),
  }
  losses = {}
  for name, config in (
    ("f32", TINY),
    ("bf16_remat", TINY.replace(dtype="bfloat16", remat="save_dots")),
  ):
    tx = optimizer.llama_adamw(param_axes=param_axes(config), total_steps=4)
    b = StepBuilder(config, tx, mesh, {})
    state = b.init(0)
    assert state.params["blocks"][0]["attn"]["q"].dtype == jnp.float32  # master weights
    step = b.build((2, 8))
    state, metrics = step(state, batch, b.step_inputs())
    losses[name] = float(metrics["loss"])
    assert bool(metrics["finite"])
  assert losses["bf16_remat"] == pytest.approx(losses["f32"], rel=2e-2)


def test_one_device_table_and_no_mfu_for_an_unknown_device():
  from core.tracking import carbon
  from core.train import throughput

  # The table MFU and carbon projections read is one: H100 PCIe is 756 dense bf16 in both.
  assert (
    throughput.table_peak("NVIDIA H100 PCIe")
    == carbon.resolve_device("h100-pcie").peak_tflops * 1e12
    == 756e12
  )
  assert throughput.table_peak("NVIDIA H100 80GB HBM3", "float32") == 67e12
  # A device the table does not know gets no peak, never another device's.
  assert throughput.table_peak("NVIDIA GH200 480GB") is None
  assert throughput.table_peak("Some Accelerator v9") is None
