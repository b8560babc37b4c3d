"""Presets against the papers' parameter tables, and every model gin file builds."""

import json
import subprocess
import sys
from pathlib import Path

import gin
import jax
import pytest
from flax import nnx

from core.model.config import ModelConfig
from core.model.flops import abstract_model, flops_per_token, matmul_params, param_counts
from core.model.transformer import Transformer
from launch import gin_config

REPO = Path(__file__).resolve().parent.parent

# Gemma (Table 2) and Gemma 2 (Table 2) publish embedding / non-embedding counts.
# LLaMA (Table 2) rounds to 6.7B .. 65.2B; the exact totals are those of the
# released checkpoints, which the paper's sizes round.
PUBLISHED = {
  "gemma_2b": (524_550_144, 1_981_884_416),
  "gemma_7b": (786_825_216, 7_751_248_896),
  "gemma2_2b": (590_118_912, 2_024_517_888),
  "gemma2_9b": (917_962_752, 8_324_201_984),
  "gemma2_27b": (1_180_237_824, 26_047_480_320),
}
LLAMA_TOTALS = {
  "llama_7b": (6_738_415_616, "6.7B"),
  "llama_13b": (13_015_864_320, "13.0B"),
  "llama_33b": (32_528_943_616, "32.5B"),
  "llama_65b": (65_285_660_672, "65.2B"),
}


def build_preset(name: str, *params: str) -> ModelConfig:
  files = [REPO / "gin" / "models" / f"{name}.gin"]
  gin_config.parse(files, params)
  return gin_config.build(ModelConfig, files)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_gemma_presets_equal_published_counts(name):
  counts = param_counts(build_preset(name))
  assert (counts["embedding"], counts["non_embedding"]) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(LLAMA_TOTALS))
def test_llama_presets_equal_released_totals(name):
  config = build_preset(name)
  counts = param_counts(config)
  total, rounded = LLAMA_TOTALS[name]
  assert counts["total"] == total
  # The paper truncates to one decimal (65.29B is listed as 65.2B).
  assert f"{counts['total'] // 10**8 / 10:.1f}B" == rounded
  # Untied: both vocabulary tables count as embedding parameters.
  assert counts["embedding"] == 2 * config.vocab_size * config.embed_dim


@pytest.mark.parametrize("name", ["tiny_gemma", "tiny_gemma2", "tiny_llama"])
def test_abstract_model_has_the_initialized_models_parameters(name):
  """param_counts reads the abstract model: its leaves are the real model's, path for path."""

  def shapes(model):
    state = nnx.state(model, nnx.Param)
    return {
      jax.tree_util.keystr(path): (tuple(x.shape), x.dtype)
      for path, x in jax.tree_util.tree_leaves_with_path(state)
    }

  config = build_preset(name)
  abstract = abstract_model(config)
  assert all(
    isinstance(x, jax.ShapeDtypeStruct)
    for x in jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param))
  )
  assert shapes(abstract) == shapes(Transformer(config, rngs=nnx.Rngs(0)))


def test_params_cli_prints_json():
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.cli",
      "params",
      "--gin_file",
      "gin/models/gemma_7b.gin",
      "--json",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  )
  assert json.loads(out.stdout) == {
    "embedding": 786_825_216,
    "non_embedding": 7_751_248_896,
    "total": 786_825_216 + 7_751_248_896,
  }


def test_gin_param_overrides_preset():
  mha = param_counts(build_preset("gemma_2b", "core.model.config.ModelConfig.num_kv_heads = 8"))
  mqa_attn_kv = 2 * 2048 * 256 * 1
  mha_attn_kv = 2 * 2048 * 256 * 8
  assert mha["non_embedding"] - PUBLISHED["gemma_2b"][1] == 18 * (mha_attn_kv - mqa_attn_kv)


def test_tiny_presets_differ_from_big_sibling_only_in_sizes():
  size_fields = {
    "vocab_size",
    "embed_dim",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "max_seq_len",
    "window",
    "mlp_multiple_of",
  }
  for tiny, big in [
    ("tiny_gemma", "gemma_2b"),
    ("tiny_gemma2", "gemma2_2b"),
    ("tiny_llama", "llama_7b"),
  ]:
    gin.clear_config()
    a = build_preset(tiny).to_dict()
    gin.clear_config()
    b = build_preset(big).to_dict()
    different = {k for k in a if a[k] != b[k]}
    assert different <= size_fields, (tiny, different - size_fields)


def test_model_gin_files_parse_finalize_and_build():
  """Every complete model file builds; base files state what they require."""
  for path in sorted((REPO / "gin" / "models").rglob("*.gin")):
    gin.clear_config()
    text = path.read_text()
    assert text.startswith("#") and "Provides:" in text and "Requires:" in text, path
    gin_config.parse([path])
    if path.parent.name == "base":
      with pytest.raises(gin_config.GinConfigError, match="missing required values"):
        gin_config.build(ModelConfig, [path])
    else:
      assert "Parameters:" in text, path
      abstract_model(gin_config.build(ModelConfig, [path]))


def test_flops_per_token_matches_6n_rule_for_llama():
  config = build_preset("llama_7b")
  n = matmul_params(config)
  # Non-embedding weights plus the output projection.
  assert n == param_counts(config)["non_embedding"] - 65 * 4096 + 32000 * 4096
  flops = flops_per_token(config, seq_len=2048)
  attention = 3 * 32 * 4 * 32 * 128 * 2048
  assert flops == 6 * n + attention
