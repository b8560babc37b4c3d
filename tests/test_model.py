"""Model components: masks, causality, packing, attention variants, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core.model.masking import dense_mask, training_spec
from core.model.config import ConfigError, llama_mlp_dim
from core.model.positions import apply_rope
from core.model.transformer import Transformer
from core.train import partition
from tests.tiny_model import FAMILIES, tiny_config


def model_and_tokens(config, length=24, batch=2, seed=0):
  model = Transformer(config, rngs=nnx.Rngs(seed))
  tokens = jax.random.randint(jax.random.key(seed + 1), (batch, length), 0, config.vocab_size)
  return model, tokens


VARIANTS = {
  **FAMILIES,
  "post_layernorm_learned": dict(
    norm="layernorm", norm_placement="post", position_embedding="learned", activation="relu"
  ),
  "no_norm_no_positions": dict(norm="none", position_embedding="none", activation="relu2"),
  "gelu_reglu_mix": dict(activation="reglu"),
  "gelu": dict(activation="gelu"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_future_tokens_never_change_past_logits(variant):
  config = tiny_config(**VARIANTS[variant])
  model, tokens = model_and_tokens(config)
  cut = 13
  changed = tokens.at[:, cut:].set((tokens[:, cut:] + 1) % config.vocab_size)
  a, b = model(tokens), model(changed)
  assert a.shape == (2, 24, config.vocab_size) and a.dtype == jnp.float32
  np.testing.assert_allclose(a[:, :cut], b[:, :cut], atol=1e-5)
  assert not np.allclose(a[:, cut:], b[:, cut:])


def test_local_layer_with_window_at_least_length_equals_global():
  length = 16
  local = tiny_config(attention_pattern=("local",), window=length)
  model, tokens = model_and_tokens(local, length=length)
  as_global = Transformer(
    local.replace(attention_pattern=("global",), window=None), rngs=nnx.Rngs(0)
  )
  np.testing.assert_allclose(model(tokens), as_global(tokens), atol=1e-6)
  short = Transformer(local.replace(window=4), rngs=nnx.Rngs(0))
  assert not np.allclose(short(tokens), model(tokens))


def test_sliding_window_mask_sees_itself_and_window_minus_one_previous():
  spec = training_spec(6, None)
  row = np.asarray(dense_mask(spec, 6, window=3)[0, 5])
  assert row.tolist() == [False, False, False, True, True, True]
  assert np.asarray(dense_mask(spec, 6, window=None)[0, 5]).all()


@pytest.mark.parametrize("variant", ["gemma2", "llama"])
def test_packed_documents_equal_separate_documents(variant):
  """A packed row gives each document the logits it has alone: no cross-talk."""
  config = tiny_config(**VARIANTS[variant])
  model = Transformer(config, rngs=nnx.Rngs(0))
  doc_a = jax.random.randint(jax.random.key(5), (1, 9), 0, config.vocab_size)
  doc_b = jax.random.randint(jax.random.key(6), (1, 7), 0, config.vocab_size)
  packed = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, 4), jnp.int32)], axis=1)
  segments = jnp.array([[1] * 9 + [2] * 7 + [0] * 4])
  positions = jnp.array([list(range(9)) + list(range(7)) + [0] * 4])
  out = model(packed, positions=positions, segment_ids=segments)
  np.testing.assert_allclose(out[:, :9], model(doc_a), atol=1e-5)
  np.testing.assert_allclose(out[:, 9:16], model(doc_b), atol=1e-5)


def test_attention_implementations_agree():
  config = tiny_config(**VARIANTS["llama"])
  model, tokens = model_and_tokens(config)
  other = Transformer(config.replace(attention_impl="dot_product_attention"), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(model(tokens), other(tokens), atol=1e-5)
  windowed = tiny_config(attention_pattern=("local", "global"), window=5)
  a, tokens = model_and_tokens(windowed)
  b = Transformer(windowed.replace(attention_impl="dot_product_attention"), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(a(tokens), b(tokens), atol=1e-5)
  segments = jnp.array([[1] * 10 + [2] * 14] * 2)
  np.testing.assert_allclose(
    a(tokens, segment_ids=segments), b(tokens, segment_ids=segments), atol=1e-5
  )


def test_kv_head_counts_select_mha_gqa_mqa():
  for kv in (4, 2, 1):
    model = Transformer(tiny_config(num_kv_heads=kv), rngs=nnx.Rngs(0))
    assert model.blocks[0].attn.k[...].shape == (32, kv, 8)
    assert model.blocks[0].attn.q[...].shape == (32, 4, 8)


def test_soft_caps_bound_logits():
  config = tiny_config(final_softcap=2.0)
  model, tokens = model_and_tokens(config)
  assert float(jnp.abs(model(tokens)).max()) <= 2.0


def test_norm_placements_have_the_right_norms():
  counts = {}
  for placement in ("pre", "post", "pre_post"):
    model = Transformer(tiny_config(norm_placement=placement), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    counts[placement] = sum(
      1
      for path, _ in jax.tree_util.tree_leaves_with_path(state)
      if "norm" in jax.tree_util.keystr(path)
    )
  assert counts == {"pre": 2 * 2 + 1, "post": 2 * 2 + 1, "pre_post": 4 * 2 + 1}


def test_every_parameter_has_logical_axes_the_partition_rules_name():
  """A parameter without axes, or with a name the rules lack, would be silently replicated."""
  for variant in VARIANTS.values():
    model = Transformer(tiny_config(**variant), rngs=nnx.Rngs(0))
    for path, var in nnx.iter_graph(model):
      if isinstance(var, nnx.Param):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and set(axes) <= set(partition.DEFAULT_RULES), (path, axes)


def test_rope_is_relative():
  """Scores of rotated q, k depend only on the distance between their positions."""
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))

  def score(pq, pk):
    rq = apply_rope(q, jnp.array([[pq]]), 10_000.0)
    rk = apply_rope(k, jnp.array([[pk]]), 10_000.0)
    return float(jnp.sum(rq * rk))

  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)


def test_llama_mlp_rule():
  assert [llama_mlp_dim(d) for d in (4096, 5120, 6656, 8192)] == [11008, 13824, 17920, 22016]


def test_mlp_dim_zero_is_resolved_to_the_llama_width():
  """mlp_dim=0 asks for the rule; the config then holds the width, so equal models are equal."""
  ruled = tiny_config(mlp_dim=0, mlp_multiple_of=16)
  assert ruled.mlp_dim == llama_mlp_dim(32, 16) == 96
  explicit = tiny_config(mlp_dim=96, mlp_multiple_of=16)
  assert ruled == explicit and hash(ruled) == hash(explicit)
  assert ruled.replace(mlp_dim=0) == ruled and ruled.to_dict()["mlp_dim"] == 96


def test_remat_policies_give_the_same_gradients():
  config = tiny_config(**VARIANTS["gemma2"])
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, config.vocab_size)
  grads = []
  for remat in ("none", "full", "save_dots"):
    model = Transformer(config.replace(remat=remat), rngs=nnx.Rngs(0))
    g = nnx.grad(lambda m: jnp.mean(m(tokens) ** 2))(model)
    grads.append(jax.tree_util.tree_leaves(g))
  for other in grads[1:]:
    for a, b in zip(grads[0], other):
      np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_keeps_float32_logits():
  model, tokens = model_and_tokens(tiny_config(dtype="bfloat16"))
  out = model(tokens)
  assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())


@pytest.mark.parametrize(
  "changes, message",
  [
    (dict(num_heads=3), "multiple of num_kv_heads"),
    (dict(activation="swish"), "activation must be one of"),
    (dict(norm_placement="middle"), "norm_placement must be one of"),
    (dict(attention_pattern=("local",)), "need a positive window"),
    (dict(attention_pattern=("global", "sliding")), "attention_pattern entry"),
    (dict(attn_softcap=50.0, attention_impl="dot_product_attention"), "soft-capping"),
    (
      dict(attn_softcap=50.0, attention_impl="cudnn", dtype="bfloat16"),
      "soft-capping.*'blockwise'",
    ),
    (dict(attention_impl="cudnn"), "bfloat16 or float16"),
    (dict(attention_impl="splash"), "head_dim a multiple of 128"),
    (dict(attention_impl="splash", head_dim=128, attention_block_q=100), "multiples of 128"),
    (dict(attention_block_k=0), "attention_block_k must be a positive int"),
    (dict(attention_impl="flash"), "attention_impl must be one of"),
    (dict(embed_dim=0), "embed_dim must be a positive int"),
    (dict(mlp_dim=-1), "mlp_dim must be a positive int, or 0 for LLaMA's"),
    (dict(mlp_dim=0, mlp_multiple_of=0), "mlp_multiple_of must be a positive int"),
    (dict(head_dim=7), "even head_dim"),
  ],
)
def test_invalid_configs_are_clear_errors(changes, message):
  with pytest.raises(ConfigError, match=message):
    tiny_config(**changes)


def test_learned_positions_reject_sequences_beyond_the_table():
  model, tokens = model_and_tokens(
    tiny_config(position_embedding="learned", max_seq_len=16), length=20
  )
  with pytest.raises(ValueError, match="exceeds max_seq_len"):
    model(tokens)
