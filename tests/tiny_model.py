"""One tiny model shape for the tests: they state only what they vary from it."""

from core.model.config import ModelConfig

# Every size and variant ModelConfig requires, at a size that runs in milliseconds on a CPU:
# 2 layers of 4 query / 2 key-value heads of width 8 (GQA), Gemma-style tied, scaled embeddings.
TINY = dict(
  vocab_size=97,
  embed_dim=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=48,
  max_seq_len=64,
  activation="geglu",
  norm="rmsnorm",
  norm_placement="pre",
  position_embedding="rope",
  tie_embeddings=True,
  scale_embeddings=True,
)


def tiny_config(**overrides) -> ModelConfig:
  """TINY with `overrides` replacing or adding fields."""
  return ModelConfig(**{**TINY, **overrides})


# The published families' distinguishing settings on the tiny shape, for tests that run one
# check across them. A test that needs a family differently states only the difference.
FAMILIES = {
  "gemma": dict(num_kv_heads=1, rms_scale_plus_one=True),
  "gemma2": dict(
    norm_placement="pre_post",
    attention_pattern=("local", "global"),
    window=5,
    attn_softcap=50.0,
    final_softcap=30.0,
    query_pre_attn_scalar=12.0,
  ),
  "llama": dict(
    activation="swiglu",
    mlp_dim=0,
    mlp_multiple_of=16,
    tie_embeddings=False,
    scale_embeddings=False,
    num_kv_heads=4,
  ),
}
