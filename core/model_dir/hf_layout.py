"""What an ablax model is in Hugging Face's terms: the one mapping import and export share.

core/model_dir/hf_import.py reads Hugging Face checkpoints through these tables and
core/model_dir/hf_export.py writes them, so the two directions cannot disagree on
a name, a layout or a convention.

Layout differences, HF -> ablax:
  q/k/v_proj.weight (N*H, D) -> (D, N, H)     o_proj.weight (D, N*H) -> (N, H, D)
  gate/up_proj.weight (F, D) -> (D, F)        down_proj.weight (D, F) -> (F, D)
  lm_head.weight (V, D) -> unembed (D, V)     norms: Gemma stores the s of
  x * (1 + s) and LLaMA the s of x * s, the two forms ModelConfig offers.
Every one of these is "transpose, then reshape", so both directions are exact
(no arithmetic touches a weight). RoPE needs no permutation: both use the
half-split layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from core.model.config import ModelConfig

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"

# model_type -> the CausalLM class whose weights we read and write.
FAMILIES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "llama": "LlamaForCausalLM"}

# What each family fixes, as ModelConfig fields. A config is exported as the
# family whose conventions it has, and an imported checkpoint gets them.
# Every config has RMSNorm and RoPE (CONVENTIONS_ALL).
CONVENTIONS_ALL = {"norm": "rmsnorm", "position_embedding": "rope"}
CONVENTIONS = {
  "gemma": dict(
    norm_placement="pre", rms_scale_plus_one=True, scale_embeddings=True, activation="geglu"
  ),
  "gemma2": dict(
    norm_placement="pre_post", rms_scale_plus_one=True, scale_embeddings=True, activation="geglu"
  ),
  "llama": dict(
    norm_placement="pre", rms_scale_plus_one=False, scale_embeddings=False, activation="swiglu"
  ),
}
# tie_word_embeddings when config.json leaves it out (the config classes' defaults).
TIED_BY_DEFAULT = {"gemma": True, "gemma2": True, "llama": False}
# The config.json key of the MLP activation, and the value each of ours is written as.
ACTIVATION_KEY = {"gemma": "hidden_act", "gemma2": "hidden_activation", "llama": "hidden_act"}
HF_ACTIVATION = {"geglu": "gelu_pytorch_tanh", "swiglu": "silu"}
# transformers activation names that compute what our registry computes (import accepts all).
TANH_GELU = ("gelu_pytorch_tanh", "gelu_new")
# Gemma 2's layer_types entries <-> our attention kinds.
LAYER_TYPES = {"global": "full_attention", "local": "sliding_attention"}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor and the ablax parameter it is.

  transposed: the HF tensor is the transpose of ours, reshaped (heads split or
  joined); otherwise the two are the same array.
  """

  hf_name: str
  name: str
  hf_shape: tuple[int, ...]
  shape: tuple[int, ...]
  transposed: bool = False

  def to_ablax(self, x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T.reshape(self.shape) if self.transposed else x)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(self.hf_shape[::-1]).T if self.transposed else x)


def tensor_specs(family: str, config: ModelConfig) -> list[TensorSpec]:
  """Every tensor of a `family` checkpoint of `config`, in the order HF lists them."""
  c = config
  d, n, k, h, f, v = (c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim, c.vocab_size)
  specs = [TensorSpec("model.embed_tokens.weight", "embedder/embedding", (v, d), (v, d))]
  for i in range(c.num_layers):
    hf, ours = f"model.layers.{i}.", f"blocks/{i}/"

    def add(hf_name, name, hf_shape, shape, transposed=True):
      specs.append(TensorSpec(hf + hf_name, ours + name, hf_shape, shape, transposed))

    add("self_attn.q_proj.weight", "attn/q", (n * h, d), (d, n, h))
    add("self_attn.k_proj.weight", "attn/k", (k * h, d), (d, k, h))
    add("self_attn.v_proj.weight", "attn/v", (k * h, d), (d, k, h))
    add("self_attn.o_proj.weight", "attn/o", (d, n * h), (n, h, d))
    add("mlp.gate_proj.weight", "mlp/gate", (f, d), (d, f))
    add("mlp.up_proj.weight", "mlp/up", (f, d), (d, f))
    add("mlp.down_proj.weight", "mlp/down", (d, f), (f, d))
    add("input_layernorm.weight", "attn_norm/scale", (d,), (d,), False)
    if family == "gemma2":
      add("post_attention_layernorm.weight", "attn_out_norm/scale", (d,), (d,), False)
      add("pre_feedforward_layernorm.weight", "mlp_norm/scale", (d,), (d,), False)
      add("post_feedforward_layernorm.weight", "mlp_out_norm/scale", (d,), (d,), False)
    else:
      # In pre-norm models HF's post_attention_layernorm is the norm before the MLP.
      add("post_attention_layernorm.weight", "mlp_norm/scale", (d,), (d,), False)
  specs.append(TensorSpec("model.norm.weight", "final_norm/scale", (d,), (d,)))
  if not c.tie_embeddings:
    specs.append(TensorSpec("lm_head.weight", "embedder/unembed", (v, d), (d, v), True))
  return specs


def natural_key(name: str) -> list[Any]:
  """Sort key that puts layers.2 before layers.10."""
  return [int(p) if p.isdigit() else p for p in name.replace(".", " . ").split()]
