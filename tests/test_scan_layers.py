"""Scanned layers (ModelConfig.scan_layers): the same model as the unrolled one, in every use."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from core.eval.sampling import generate
from core.model.config import ConfigError
from core.model.transformer import Transformer
from core.model_dir import io
from core.train import mesh as meshlib
from core.train import partition
from core.train.step import StepBuilder
from tests.tiny_model import FAMILIES, tiny_config

BASE = dict(num_layers=4)
VARIANTS = {
  # Gemma 2's (local, global) period with every soft-cap, scanned as 2 repeats of a pair.
  "gemma2": {**FAMILIES["gemma2"], "remat": "full"},
  # LLaMA: one global layer per period, GQA, untied, blocks saving matmul outputs.
  "llama": dict(
    activation="swiglu", tie_embeddings=False, scale_embeddings=False, remat="save_dots"
  ),
  # A period of three, no remat.
  "three": dict(num_layers=6, attention_pattern=("local", "local", "global"), window=3),
}


def pair(variant):
  config = tiny_config(**{**BASE, **VARIANTS[variant]})
  return (
    Transformer(config, rngs=nnx.Rngs(0)),
    Transformer(config.replace(scan_layers=True), rngs=nnx.Rngs(0)),
  )


def tokens(config, length=24, batch=2):
  return jax.random.randint(jax.random.key(1), (batch, length), 0, config.vocab_size)


def close(a, b, what):
  # float32: the scan body fuses differently from the unrolled blocks, and XLA picks a
  # different fusion on different CPUs, so sums differ in the last bits. Elements of q/k
  # gradients near zero come from cancelling sums, so the absolute slack scales with the
  # largest value: 1e-5 of it (~84 float32 ulps of the scale). A real layout bug is off
  # by about the scale itself (measured: swapped layers 1.3x, a window off by one 0.87x);
  # test_scan_tolerance_catches_a_swapped_layer checks that this margin still fails it.
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5 * max(np.abs(a).max(), 1e-30), err_msg=what)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_scanned_equals_unrolled_in_weights_logits_and_gradients(variant):
  unrolled, scanned = pair(variant)
  ids = tokens(unrolled.config)
  # Same seed, same initial weights: the scanned layout stacks the unrolled layers.
  flat_u, flat_s = io.flat_params(unrolled), io.flat_params(scanned)
  assert flat_u.keys() == flat_s.keys()
  for name in flat_u:
    np.testing.assert_array_equal(flat_u[name], flat_s[name], err_msg=name)

  @nnx.jit
  def loss_and_grads(model):
    return nnx.value_and_grad(lambda m: jnp.mean(jax.nn.log_softmax(m(ids))[..., 3]))(model)

  loss_u, grads_u = loss_and_grads(unrolled)
  loss_s, grads_s = loss_and_grads(scanned)
  close(nnx.jit(lambda m: m(ids))(unrolled), nnx.jit(lambda m: m(ids))(scanned), "logits")
  close(loss_u, loss_s, "loss")
  gu = {io._path_name(p): g for p, g in jax.tree_util.tree_leaves_with_path(grads_u)}
  gs = io.unstack_layers(
    {io._path_name(p): g for p, g in jax.tree_util.tree_leaves_with_path(grads_s)}, scanned.config
  )
  assert gu.keys() == gs.keys()
  for name in gu:
    close(gu[name], gs[name], f"gradient of {name}")


def test_stacked_weights_carry_the_layers_axis_and_are_replicated_over_it():
  _, scanned = pair("gemma2")
  state = nnx.state(scanned, nnx.Param)
  q = state["blocks"][1]["attn"]["q"]
  assert q.shape == (2, 32, 4, 8)
  assert q.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")
  mesh = meshlib.make_mesh(meshlib.MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
  specs = partition.param_specs(state, mesh, partition.merged_rules())
  assert tuple(specs["blocks"][1]["attn"]["q"]) == (None, "fsdp", "tensor", None)


def test_model_files_are_per_layer_whatever_the_layout(tmp_path):
  unrolled, scanned = pair("gemma2")
  io.save_model(tmp_path / "scanned", scanned, scanned.config)
  # load_model checks the stored names against the per-layer names: a stacked file fails.
  back_s, config, _ = io.load_model(tmp_path / "scanned")
  assert config.scan_layers and back_s.config.scan_layers
  # The same files rebuild the unrolled model.
  back_u = io.model_from_params(unrolled.config, io.flat_params(back_s))
  ids = tokens(unrolled.config)
  ref = nnx.jit(lambda m: m(ids))(unrolled)
  close(nnx.jit(lambda m: m(ids))(back_u), ref, "loaded unrolled")
  close(nnx.jit(lambda m: m(ids))(back_s), ref, "loaded scanned")


def test_cached_decoding_of_a_scanned_model_equals_the_unrolled_one():
  unrolled, scanned = pair("gemma2")
  prompt = [[5, 7, 11, 13, 17]]
  out_u = generate(unrolled, prompt, max_new_tokens=6)
  out_s = generate(scanned, prompt, max_new_tokens=6)
  np.testing.assert_array_equal(out_u.tokens, out_s.tokens)


def test_a_train_step_of_the_scanned_model_equals_the_unrolled_one():
  config = tiny_config(**{**BASE, **VARIANTS["gemma2"]})
  mesh = meshlib.make_mesh(meshlib.MeshConfig(data=1, fsdp=2, tensor=1), jax.devices()[:2])
  rules = partition.merged_rules()
  rng = np.random.default_rng(0)
  ids = rng.integers(0, config.vocab_size, (4, 17))
  batch = {
    "inputs": ids[:, :-1],
    "targets": ids[:, 1:],
    "segment_ids": np.ones((4, 16), np.int32),
    "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (4, 16)),
    "loss_mask": np.ones((4, 16), np.float32),
  }
  # SGD: the update is proportional to the gradient (Adam would amplify last-bit
  # differences of near-zero gradients to whole steps).
  results = []
  for scan in (False, True):
    builder = StepBuilder(config.replace(scan_layers=scan), optax.sgd(0.5), mesh, rules)
    state = builder.init(0)
    step = builder.build((4, 16))
    for _ in range(2):
      state, metrics = step(state, batch, builder.step_inputs())
    flat = {
      io._path_name(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(state.params)
    }
    if scan:
      flat = io.unstack_layers(flat, builder.config)
    results.append((float(metrics["loss"]), flat))
  (loss_u, params_u), (loss_s, params_s) = results
  close(loss_u, loss_s, "loss after 2 steps")
  for name in params_u:
    np.testing.assert_allclose(params_u[name], params_s[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_scan_needs_whole_periods():
  with pytest.raises(ConfigError, match="multiple of 2"):
    tiny_config(**{**BASE, **VARIANTS["gemma2"], "num_layers": 5, "scan_layers": True})


def test_scan_tolerance_catches_a_swapped_layer():
  # The tolerance of close() must still fail a real layout bug: swap the two repeats of
  # the local layer (layers 0 and 2) in the stacked weights and compare with the unrolled model.
  unrolled, scanned = pair("gemma2")
  ids = tokens(unrolled.config)
  ref = nnx.jit(lambda m: m(ids))(unrolled)
  state = nnx.state(scanned, nnx.Param)
  state["blocks"][0] = jax.tree.map(lambda a: a[::-1], state["blocks"][0])
  nnx.update(scanned, state)
  with pytest.raises(AssertionError, match="swapped"):
    close(nnx.jit(lambda m: m(ids))(scanned), ref, "swapped")
