"""The vocabulary-tiled loss equals the loss from whole logits, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from core.model.transformer import Transformer
from core.train import mesh as meshlib, partition
from core.train.loss import chunked_cross_entropy, cross_entropy
from core.train.step import StepBuilder
from core.train.synthetic import SyntheticBatches
from tests.tiny_model import tiny_config

BASE = dict(vocab_size=203, max_seq_len=32)


@pytest.mark.parametrize(
  "tied, cap, chunk",
  [(True, None, 64), (False, 5.0, 50), (True, 5.0, 500)],
  ids=["tied", "untied-capped-uneven", "one-chunk"],
)
def test_chunked_cross_entropy_equals_whole_logits(tied, cap, chunk):
  """203 entries in chunks of 64 or 50: the last chunk is partial."""
  config = tiny_config(**BASE, tie_embeddings=tied, final_softcap=cap)
  model = Transformer(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, config.vocab_size)
  targets = jnp.roll(tokens, -1, axis=1).at[0, 0].set(config.vocab_size - 1)  # the last row too
  mask = jnp.ones(tokens.shape).at[1, -3:].set(0)

  def whole(params):
    sums = cross_entropy(nnx.merge(graphdef, params)(tokens), targets, mask)
    return sums[0] + 0.1 * sums[1], sums

  def tiled(params):
    m = nnx.merge(graphdef, params)
    sums = chunked_cross_entropy(
      m.hidden(tokens), m.embedder.output_rows(), targets, mask, chunk=chunk, final_softcap=cap
    )
    return sums[0] + 0.1 * sums[1], sums

  (_, a), ga = jax.value_and_grad(whole, has_aux=True)(params)
  (_, b), gb = jax.value_and_grad(tiled, has_aux=True)(params)
  np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-6)
  for x, y in zip(jax.tree.leaves(gb), jax.tree.leaves(ga)):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4)


def test_tiled_loss_never_holds_whole_logits_and_the_step_agrees():
  config = tiny_config(**{**BASE, "vocab_size": 4096, "max_seq_len": 64}, tie_embeddings=False)
  mesh = meshlib.make_mesh(meshlib.MeshConfig(1, 1, 1), jax.devices()[:1])
  batch = {
    k: jnp.asarray(v)
    for k, v in next(SyntheticBatches(vocab_size=4096, seq_len=64, batch_size=4)).items()
  }
  results = {}
  for chunk in (0, 512):
    builder = StepBuilder(
      config, optax.sgd(0.1), mesh, partition.merged_rules(), loss_vocab_chunk=chunk
    )
    state = builder.init(0)
    grads = jax.jit(builder._grads)  # pylint: disable=protected-access
    results[chunk] = grads(state.params, batch, ())
    jaxpr = jax.make_jaxpr(builder._grads)(state.params, batch, ())  # pylint: disable=protected-access
    whole = [
      e
      for e in jaxpr.eqns
      for v in e.outvars
      if getattr(v.aval, "shape", ())[-1:] == (4096,) and len(v.aval.shape) == 3
    ]
    assert bool(whole) == (chunk == 0)  # the (B, T, V) logits exist only untiled
  assert_tree = lambda a, b: [
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  ]
  assert_tree(results[512], results[0])


def test_bad_chunk_is_a_clear_error():
  with pytest.raises(ValueError, match="chunk must be positive"):
    chunked_cross_entropy(
      jnp.zeros((1, 2, 4)), jnp.zeros((8, 4)), jnp.zeros((1, 2), int), jnp.ones((1, 2)), chunk=0
    )
  config = tiny_config(**BASE, tie_embeddings=True)
  mesh = meshlib.make_mesh(meshlib.MeshConfig(1, 1, 1), jax.devices()[:1])
  with pytest.raises(ValueError, match="loss_vocab_chunk must be >= 0"):
    StepBuilder(config, optax.sgd(0.1), mesh, partition.merged_rules(), loss_vocab_chunk=-1)


def test_loss_moments_give_the_token_losses_sum_and_spread():
  from core.train.loss import log_z_and_target, loss_moments

  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
  targets = rng.integers(0, 11, (2, 5))
  mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
  total, squares, n = loss_moments(
    *log_z_and_target(jnp.asarray(logits), jnp.asarray(targets)), jnp.asarray(mask)
  )
  # Reference: numpy's log-softmax, token by token.
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  token = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(
    [total, squares, n], [(token * mask).sum(), (token**2 * mask).sum(), mask.sum()], rtol=1e-5
  )
