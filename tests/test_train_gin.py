"""Every experiment and training overlay parses, finalizes and builds its pieces (no training)."""

import gin
import pytest

from core.model.config import ModelConfig
from core.train import mesh as meshlib
from core.train import optimizer
from launch import gin_config

EXPERIMENTS = ["tiny_llama", "tiny_gemma", "tiny_gemma2", "cpu_bench"]
OVERLAYS = ["adafactor", "bf16", "remat_save_dots", "mesh_2x2x2", "single_device"]


def _build(files):
  gin_config.parse(files)
  config = gin_config.build(ModelConfig, files)
  mesh = gin_config.build(meshlib.MeshConfig, files)
  recipe = gin.query_parameter("core.train.loop.train.optimizer").selector.split(".")[-1]
  axes = {"w": ("embed", "mlp"), "scale": ("norm",)}
  tx = gin.get_configurable(getattr(optimizer, recipe))(param_axes=axes, total_steps=10)
  return config, mesh, recipe, tx


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds(name):
  config, mesh, recipe, _ = _build([f"gin/experiments/{name}.gin"])
  assert config.vocab_size == 4096 and recipe == "llama_adamw"
  assert mesh.shape(8) == (1, 8, 1)
  steps = gin_config.resolve_macro(gin.query_parameter("core.train.loop.train.num_steps"))
  assert steps > 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds(overlay):
  config, mesh, recipe, _ = _build(["gin/experiments/tiny_llama.gin", f"gin/train/{overlay}.gin"])
  if overlay == "adafactor":
    assert recipe == "adafactor"
  if overlay == "bf16":
    assert (config.dtype, config.param_dtype) == ("bfloat16", "float32")
  if overlay == "remat_save_dots":
    assert config.remat == "save_dots"
  if overlay == "mesh_2x2x2":
    assert mesh.shape(8) == (2, 2, 2)
