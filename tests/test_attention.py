"""Attention implementations: blockwise and splash equal the einsum reference, and dispatch.

Exactness is within 1e-5 in float32, for values and for gradients, on the
variants the papers ablate: sliding windows shorter than T with both soft-caps
(Gemma 2), packed rows with padding, MQA and GQA, T that is not a multiple of the
block size, and one-token decoding with the cache.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core.model import attention_impls, blockwise
from core.model.attention import attend
from core.model.cache import init_cache
from core.model.masking import training_spec
from core.model.splash import splash_attention
from core.model.transformer import Transformer
from tests.tiny_model import tiny_config

TOL = 1e-5

GEMMA2 = dict(
  num_layers=5,
  norm_placement="pre_post",
  rms_scale_plus_one=True,
  attention_pattern=("local", "global"),
  window=6,
  attn_softcap=20.0,
  final_softcap=15.0,
  query_pre_attn_scalar=12.0,
  attention_block_q=8,
  attention_block_k=16,
)


def qkv(batch, length, heads, kv_heads, head_dim, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(ks[0], (batch, length, heads, head_dim)),
    jax.random.normal(ks[1], (batch, length, kv_heads, head_dim)),
    jax.random.normal(ks[2], (batch, length, kv_heads, head_dim)),
  )


def values_and_grads(impl, q, k, v, spec, **kw):
  cot = jax.random.normal(jax.random.key(9), q.shape)
  loss = lambda q, k, v: jnp.sum(cot * attend(q, k, v, spec, impl=impl, **kw))
  return attend(q, k, v, spec, impl=impl, **kw), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def assert_same(a, b, tol=TOL):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=0)


PACKED = jnp.array([[1] * 10 + [2] * 20 + [0] * 7, [3] * 30 + [0] * 7])


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize(
  "window, cap, segments",
  [(None, None, None), (5, 3.0, None), (7, 2.0, PACKED), (None, None, PACKED), (40, None, None)],
  ids=["causal", "local-capped", "local-capped-packed", "packed", "window-over-length"],
)
def test_blockwise_equals_einsum_values_and_gradients(heads, kv_heads, window, cap, segments):
  q, k, v = qkv(2, 37, heads, kv_heads, 16)  # 37: no multiple of either block
  kw = dict(scale=0.3, attn_softcap=cap, window=window)
  spec = training_spec(37, segments)
  ref = values_and_grads("einsum", q, k, v, spec, **kw)
  got = values_and_grads("blockwise", q, k, v, spec, block_q=8, block_k=16, **kw)
  assert_same(got, ref)


def test_blockwise_gemma2_model_logits_and_gradients_equal_einsum():
  """5 layers, window 6 < T, both soft-caps, query_pre_attn_scalar, packed rows with padding."""
  config = tiny_config(**GEMMA2)
  tokens = jax.random.randint(jax.random.key(1), (2, 29), 0, config.vocab_size)
  segments = jnp.array([[1] * 12 + [2] * 13 + [0] * 4, [1] * 29])
  positions = jnp.array([list(range(12)) + list(range(13)) + [0] * 4, list(range(29))])

  def run(impl):
    model = Transformer(config.replace(attention_impl=impl), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
      logits = nnx.merge(graphdef, params)(tokens, positions=positions, segment_ids=segments)
      return jnp.mean(jnp.sin(logits)), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads

  ref, got = run("einsum"), run("blockwise")
  assert_same(got, ref)


@pytest.mark.parametrize("pattern", [("local", "global")])
def test_blockwise_decoding_with_the_cache_equals_einsum(pattern):
  """Prompt then T = 1 steps, left-padded rows: blockwise and einsum give the same logits."""
  config = tiny_config(**{**GEMMA2, "attention_pattern": pattern})
  prompt = jax.random.randint(jax.random.key(2), (2, 7), 1, config.vocab_size)
  segments = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
  positions = jnp.array([[0, 0, 0, 1, 2, 3, 4], list(range(7))])
  outs = {}
  for impl in ("einsum", "blockwise"):
    model = Transformer(config.replace(attention_impl=impl), rngs=nnx.Rngs(0))
    cache = init_cache(config, 2, 20)
    logits, cache = model(prompt, positions=positions, segment_ids=segments, cache=cache)
    steps = [logits[:, -1]]
    token = jnp.argmax(logits[:, -1:], -1)
    for i in range(5):
      logits, cache = model(token, positions=positions[:, -1:] + 1 + i, cache=cache)
      steps.append(logits[:, -1])
      token = jnp.argmax(logits, -1)
    outs[impl] = jnp.stack(steps)
  assert_same(outs["blockwise"], outs["einsum"])


def test_local_layers_visit_only_the_key_blocks_inside_the_window():
  """T = 8192, window 1024, blocks of 512: 3 key blocks per query block, not up to 16."""
  static = blockwise._Static(1.0, None, 1024, 512, 512)
  counts = []
  for i in range(16):
    lo, hi = blockwise.key_block_range(i * 512, i * 512 + 511, static, 16)
    counts.append(int(hi - lo))
  assert max(counts) == 3 and sum(counts) == 1 + 2 + 14 * 3
  glob = blockwise._Static(1.0, None, None, 512, 512)
  assert [
    int(np.subtract(*blockwise.key_block_range(i * 512, i * 512 + 511, glob, 16)[::-1]))
    for i in range(16)
  ] == list(range(1, 17))
  # The backward's transpose: key block j is seen by query blocks j .. j + 2 only.
  lo, hi = blockwise.query_block_range(5 * 512, 5 * 512 + 511, 0, static, 16)
  assert (int(lo), int(hi)) == (5, 8)


def test_blockwise_training_never_builds_a_sequence_by_sequence_array():
  """No value of the forward or backward has two dimensions of length T."""
  t = 320
  q, k, v = qkv(1, t, 4, 2, 8)
  spec = training_spec(t, jnp.ones((1, t), jnp.int32))
  loss = lambda q, k, v: jnp.sum(
    attend(
      q,
      k,
      v,
      spec,
      impl="blockwise",
      scale=0.3,
      attn_softcap=5.0,
      window=None,
      block_q=64,
      block_k=64,
    )
  )
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  def shapes(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        yield getattr(var.aval, "shape", ())
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from shapes(sub)

  seen = list(shapes(jaxpr.jaxpr))
  assert seen and not [s for s in seen if list(s).count(t) >= 2]
  dense = jax.make_jaxpr(
    lambda q, k, v: attend(q, k, v, spec, impl="einsum", scale=0.3, attn_softcap=None)
  )(q, k, v)
  assert [s for s in shapes(dense.jaxpr) if list(s).count(t) >= 2]  # the check can fail


@pytest.mark.parametrize("window, cap, packed", [(None, None, False), (64, 30.0, True)])
def test_splash_in_pallas_interpret_mode_equals_einsum(window, cap, packed):
  q, k, v = qkv(1, 256, 4, 2, 128)
  segments = jnp.array([[1] * 100 + [2] * 120 + [0] * 36]) if packed else None
  spec = training_spec(256, segments)
  kw = dict(scale=128**-0.5, attn_softcap=cap, window=window)
  cot = jax.random.normal(jax.random.key(9), q.shape)
  splash = lambda q, k, v: splash_attention(
    q, k, v, spec, block_q=128, block_k=128, interpret=True, **kw
  )
  out = splash(q, k, v)
  grads = jax.grad(lambda *a: jnp.sum(cot * splash(*a)), argnums=(0, 1, 2))(q, k, v)
  assert_same((out, grads), values_and_grads("einsum", q, k, v, spec, **kw), tol=5e-5)


def config_of(**changes):
  return tiny_config(
    **{
      **GEMMA2,
      "attn_softcap": None,
      "attention_block_q": 512,
      "attention_block_k": 512,
      **changes,
    }
  )


@pytest.mark.parametrize(
  "changes, platform, length, packed, expected",
  [
    (dict(head_dim=128), "tpu", 8192, True, "splash"),
    (dict(head_dim=128, attn_softcap=50.0), "tpu", 8192, True, "splash"),
    (dict(head_dim=64), "tpu", 8192, True, "blockwise"),  # splash needs 128-lane heads
    (dict(head_dim=128), "tpu", 1000, False, "blockwise"),  # length not in whole blocks
    (dict(head_dim=128, dtype="bfloat16"), "gpu", 8192, False, "cudnn"),
    (dict(head_dim=128, dtype="bfloat16", attn_softcap=50.0), "gpu", 8192, False, "blockwise"),
    (dict(head_dim=256, dtype="bfloat16"), "gpu", 8192, False, "blockwise"),
    (dict(head_dim=128), "gpu", 8192, False, "blockwise"),  # float32
    (dict(head_dim=128, dtype="bfloat16"), "gpu", 8192, True, "blockwise"),  # would need a mask
    (dict(), "cpu", attention_impls.CPU_BLOCKWISE_FROM - 1, True, "einsum"),
    (dict(), "cpu", attention_impls.CPU_BLOCKWISE_FROM, True, "blockwise"),
  ],
)
def test_auto_picks_per_platform_and_variant(changes, platform, length, packed, expected):
  config = config_of(**changes)
  assert attention_impls.choose(config, platform, length, packed) == expected
  kinds = attention_impls.used_by_kind(config, platform, length, packed)
  assert kinds == {"global": expected, "local": expected}


def test_block_sizes_default_per_platform_unless_bound():
  assert attention_impls.block_sizes(
    config_of(attention_block_q=None, attention_block_k=None), "cpu"
  ) == (64, 64)
  assert attention_impls.block_sizes(
    config_of(attention_block_q=None, attention_block_k=None), "tpu"
  ) == (512, 512)
  assert attention_impls.block_sizes(
    config_of(attention_block_q=64, attention_block_k=32), "tpu"
  ) == (64, 32)


def test_explicit_backends_on_the_wrong_platform_are_clear_errors():
  with pytest.raises(ValueError, match="'splash' runs on TPU only.*CPU.*'blockwise'"):
    attention_impls.choose(config_of(head_dim=128, attention_impl="splash"), "cpu", 512, False)
  with pytest.raises(ValueError, match="'cudnn' runs on GPU only"):
    attention_impls.choose(config_of(dtype="bfloat16", attention_impl="cudnn"), "tpu", 512, False)
  model = Transformer(config_of(head_dim=128, attention_impl="splash"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="runs on TPU only"):
    model(jnp.zeros((1, 8), jnp.int32))


def test_decoding_runs_einsum_or_blockwise():
  assert (
    attention_impls.choose(config_of(attention_impl="einsum"), "tpu", 8192, True, decoding=True)
    == "einsum"
  )
  assert (
    attention_impls.choose(
      config_of(head_dim=128, attention_impl="splash"), "tpu", 8192, True, decoding=True
    )
    == "blockwise"
  )
  assert attention_impls.choose(config_of(), "cpu", 64, True, decoding=True) == "einsum"


def test_blockwise_model_and_splash_kernel_under_a_training_mesh_equal_einsum():
  """Sharded over a (2, 2, 2) mesh (batch over data x fsdp, kv heads over tensor)."""
  from core.model.sharding import activation_sharding  # pylint: disable=g-import-not-at-top
  from core.train import mesh as meshlib, partition  # pylint: disable=g-import-not-at-top

  mesh = meshlib.make_mesh(meshlib.MeshConfig(2, 2, 2))
  rules = partition.merged_rules()

  q, k, v = qkv(4, 256, 4, 2, 128)
  segments = jnp.array([[1] * 100 + [2] * 156] * 2 + [[1] * 256] * 2)
  kw = dict(scale=128**-0.5, attn_softcap=30.0, window=64)
  ref = attend(q, k, v, training_spec(256, segments), impl="einsum", **kw)
  with activation_sharding(mesh, rules):
    splash = jax.jit(
      lambda q, k, v, s: splash_attention(
        q, k, v, training_spec(256, s), block_q=128, block_k=128, interpret=True, **kw
      )
    )
    got = splash(q, k, v, segments)
  assert_same(got, ref, tol=5e-5)

  config = tiny_config(**GEMMA2)
  tokens = jax.random.randint(jax.random.key(1), (4, 29), 0, config.vocab_size)
  expected = Transformer(config.replace(attention_impl="einsum"), rngs=nnx.Rngs(0))(tokens)
  model = Transformer(config.replace(attention_impl="blockwise"), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  with activation_sharding(mesh, rules):
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)
  assert_same(logits, expected)


def test_blockwise_in_bfloat16_is_as_close_to_float32_as_einsum():
  q, k, v = (x.astype(jnp.bfloat16) for x in qkv(2, 300, 4, 2, 32))
  spec = training_spec(300, None)
  kw = dict(scale=32**-0.5, attn_softcap=30.0, window=100)
  exact = attend(*(x.astype(jnp.float32) for x in (q, k, v)), spec, impl="einsum", **kw)
  error = {}
  for impl in ("einsum", "blockwise"):
    out = attend(q, k, v, spec, impl=impl, block_q=128, block_k=128, **kw)
    grad = jax.grad(
      lambda q: jnp.sum(
        attend(q, k, v, spec, impl=impl, block_q=128, block_k=128, **kw).astype(jnp.float32)
      )
    )(q)
    assert out.dtype == grad.dtype == jnp.bfloat16
    assert bool(jnp.isfinite(grad.astype(jnp.float32)).all())
    error[impl] = float(jnp.abs(out.astype(jnp.float32) - exact).max())
  assert error["blockwise"] <= 1.5 * error["einsum"] < 0.05, error


def test_target_platform_overrides_the_host_backend_while_tracing():
  """Compiling for a TPU from a CPU host: the TPU's choice (here splash) is what gets traced."""
  config = config_of(head_dim=128, attention_block_q=128, attention_block_k=128)
  assert attention_impls.current_platform() == "cpu"
  with attention_impls.target_platform("tpu"):
    assert attention_impls.current_platform() == "tpu"
    assert attention_impls.choose(config, attention_impls.current_platform(), 256, True) == "splash"
    jaxpr = jax.make_jaxpr(Transformer(config, rngs=nnx.Rngs(0)))(jnp.zeros((1, 256), jnp.int32))
    assert "pallas_call" in str(jaxpr)
  assert attention_impls.current_platform() == "cpu"
  with pytest.raises(ValueError, match="platform must be one of"):
    with attention_impls.target_platform("npu"):
      pass
