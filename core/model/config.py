"""ModelConfig: every architectural choice the Gemma 1/2 and LLaMA papers ablate, as data.

Sizes have no defaults: a preset (gin/models/*.gin) must give them, so a missing
value is an error rather than a silently different model. Variants are strings
or per-layer tuples so that gin binds them directly and MLflow logs them
readably.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from core.errors import UserError
from core.model import attention_impls
from core.model.attention_impls import IMPLS as ATTENTION_IMPLS

# One registry per variant axis; the strings are what gin files and sweeps bind.
ATTENTION_KINDS = ("global", "local")
NORMS = ("rmsnorm", "layernorm", "none")
NORM_PLACEMENTS = ("pre", "post", "pre_post")
POSITION_EMBEDDINGS = ("rope", "learned", "none")
REMAT_POLICIES = ("none", "full", "save_dots")
# name -> (activation, gated). Gated variants multiply act(x W_gate) by x W_up.
ACTIVATIONS = {
  "geglu": ("gelu_tanh", True),
  "swiglu": ("silu", True),
  "reglu": ("relu", True),
  "relu": ("relu", False),
  "gelu": ("gelu_tanh", False),
  "relu2": ("squared_relu", False),
}
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(UserError, ValueError):
  """A model configuration that cannot describe a valid model."""


def llama_mlp_dim(embed_dim: int, multiple_of: int = 256) -> int:
  """LLaMA's SwiGLU hidden size: 2/3 of 4d, rounded up to a multiple.

  This keeps the parameter count of a 3-matrix gated MLP equal to that of a
  2-matrix MLP with hidden size 4d (LLaMA paper, section 2).
  """
  hidden = int(2 * 4 * embed_dim / 3)
  return multiple_of * math.ceil(hidden / multiple_of)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only Transformer.

  Attributes:
    vocab_size: number of token ids (rows of the embedding table).
    embed_dim: model width D.
    num_layers: number of Transformer blocks.
    num_heads: query heads N.
    num_kv_heads: key/value heads K; N = multi-head, 1 = multi-query, else grouped-query.
    head_dim: H, width of one head.
    mlp_dim: hidden width F of the feed-forward block. 0 asks for LLaMA's rule
      `llama_mlp_dim(embed_dim, mlp_multiple_of)`, resolved on construction: a
      built config's mlp_dim is always the width the model has (so replacing
      embed_dim later keeps that width; pass mlp_dim=0 again to re-derive it).
    max_seq_len: context length (learned positions need it; recorded for all).
    activation: a key of ACTIVATIONS.
    norm: 'rmsnorm', 'layernorm' or 'none'.
    norm_placement: 'pre' (LLaMA), 'post' (original Transformer) or 'pre_post' (Gemma 2).
    rms_scale_plus_one: Gemma parametrizes RMSNorm as x * (1 + scale) with scale
      initialized to 0; LLaMA as x * scale with scale initialized to 1.
    norm_eps: epsilon of the normalizers.
    position_embedding: the kind of position information: 'rope' (rotary, applied to
      queries and keys), 'learned' (an absolute table added to the embeddings) or
      'none'. Not the (B, T) `positions` array the forward pass takes.
    rope_base: RoPE wavelength base.
    attention_pattern: per-layer kinds ('global'/'local'), tiled over the layers
      (('local', 'global') is Gemma 2's alternation).
    window: sliding-window size of local layers: a query attends to itself and
      the window - 1 previous positions.
    attn_softcap: soft-cap c of attention logits, c * tanh(logits / c); None = off.
    final_softcap: soft-cap of the output logits; None = off.
    query_pre_attn_scalar: queries are scaled by query_pre_attn_scalar ** -0.5;
      None means head_dim (the usual 1/sqrt(head_dim)).
    tie_embeddings: output projection shares the input embedding table.
    scale_embeddings: multiply input embeddings by sqrt(embed_dim) (Gemma).
    attention_impl: 'auto' (the default: splash on TPU, cuDNN or blockwise on
      GPU, einsum or blockwise on CPU by length), 'einsum' (the dense XLA
      reference), 'blockwise' (flash-style pure JAX, memory linear in T),
      'splash' (TPU), 'cudnn' (GPU) or 'dot_product_attention' (jax chooses);
      see core/model/attention_impls.py.
    attention_block_q, attention_block_k: query and key block sizes of the
      blockwise and splash implementations; None = the platform's default
      (attention_impls.DEFAULT_BLOCK).
    dtype: compute dtype; param_dtype: storage dtype of the weights.
    remat: rematerialization of each block in the backward pass: 'none',
      'full', or 'save_dots' (keep matmul outputs, recompute the rest).
    scan_layers: run the layers as a `lax.scan` over the repeating period of
      attention_pattern (e.g. Gemma 2's (local, global) pair), with the weights
      of each position in the period stacked over the repeats. XLA then
      compiles one period instead of num_layers unrolled blocks: the same
      model and initial weights, a fraction of the compile time and memory.
  """

  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_seq_len: int
  activation: str
  norm: str
  norm_placement: str
  position_embedding: str
  tie_embeddings: bool
  scale_embeddings: bool
  rms_scale_plus_one: bool = False
  norm_eps: float = 1e-6
  rope_base: float = 10_000.0
  mlp_multiple_of: int = 256
  attention_pattern: tuple[str, ...] = ("global",)
  window: int | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  query_pre_attn_scalar: float | None = None
  attention_impl: str = "auto"
  attention_block_q: int | None = None
  attention_block_k: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False

  def __post_init__(self):
    # gin hands lists for tuples; keep the config hashable and comparable.
    object.__setattr__(self, "attention_pattern", tuple(self.attention_pattern))
    # mlp_dim=0 asks for LLaMA's rule; holding the width it gives keeps one name for the
    # width and makes configs of equal models compare equal. Bad sizes: validate() says.
    if self.mlp_dim == 0 and _positive_int(self.embed_dim) and _positive_int(self.mlp_multiple_of):
      object.__setattr__(self, "mlp_dim", llama_mlp_dim(self.embed_dim, self.mlp_multiple_of))
    self.validate()

  # -- derived values -------------------------------------------------------

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    """The attention kind of every layer, the pattern tiled over num_layers."""
    pattern = self.attention_pattern
    return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

  @property
  def layer_period(self) -> tuple[tuple[str, ...], int]:
    """(the kinds of one period, repeats): what scan_layers scans, e.g. (('local', 'global'), 21)."""
    return self.attention_pattern, self.num_layers // len(self.attention_pattern)

  @property
  def query_scale(self) -> float:
    scalar = self.query_pre_attn_scalar or self.head_dim
    return float(scalar) ** -0.5

  @property
  def gated(self) -> bool:
    return ACTIVATIONS[self.activation][1]

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  # -- validation -------------------------------------------------------------

  def validate(self) -> None:
    def need(cond: bool, msg: str) -> None:
      if not cond:
        raise ConfigError(f"ModelConfig: {msg}")

    for name in (
      "vocab_size",
      "embed_dim",
      "num_layers",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "max_seq_len",
      "mlp_multiple_of",
    ):
      value = getattr(self, name)
      need(_positive_int(value), f"{name} must be a positive int, got {value!r}")
    need(
      _positive_int(self.mlp_dim),
      f"mlp_dim must be a positive int, or 0 for LLaMA's 2/3*4d rule, got {self.mlp_dim!r}",
    )
    need(
      self.num_heads % self.num_kv_heads == 0,
      f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})",
    )
    _check_choice("activation", self.activation, tuple(ACTIVATIONS))
    _check_choice("norm", self.norm, NORMS)
    _check_choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
    _check_choice("position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
    _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    _check_choice("remat", self.remat, REMAT_POLICIES)
    _check_choice("dtype", self.dtype, DTYPES)
    _check_choice("param_dtype", self.param_dtype, DTYPES)
    need(len(self.attention_pattern) > 0, "attention_pattern must name at least one layer kind")
    for kind in self.attention_pattern:
      _check_choice("attention_pattern entry", kind, ATTENTION_KINDS)
    if "local" in self.layer_kinds:
      need(
        isinstance(self.window, int) and self.window > 0,
        f"local attention layers need a positive window, got {self.window!r}",
      )
    if isinstance(self.window, int):
      # A window of the whole context or more is global attention under another name.
      need(
        self.window <= self.max_seq_len,
        f"window {self.window} is longer than max_seq_len {self.max_seq_len}: local layers "
        "would attend to the whole context; lower the window or raise max_seq_len",
      )
    for name in ("attn_softcap", "final_softcap", "query_pre_attn_scalar"):
      value = getattr(self, name)
      need(value is None or value > 0, f"{name} must be positive or None, got {value!r}")
    for name in ("attention_block_q", "attention_block_k"):
      value = getattr(self, name)
      need(
        value is None or (isinstance(value, int) and value > 0),
        f"{name} must be a positive int or None (the platform's default), got {value!r}",
      )
    why = attention_impls.unsupported(
      self.attention_impl,
      head_dim=self.head_dim,
      dtype=self.dtype,
      attn_softcap=self.attn_softcap,
      block_q=self.attention_block_q,
      block_k=self.attention_block_k,
    )
    need(
      why is None,
      f"attention_impl={self.attention_impl!r} cannot serve this model: {why}; "
      "use attention_impl='auto' or 'blockwise'",
    )
    need(
      isinstance(self.scan_layers, bool),
      f"scan_layers must be True or False, got {self.scan_layers!r}",
    )
    if self.scan_layers:
      need(
        self.num_layers % len(self.attention_pattern) == 0,
        f"scan_layers scans whole periods of attention_pattern {self.attention_pattern}, but "
        f"num_layers={self.num_layers} is not a multiple of {len(self.attention_pattern)}",
      )
    if self.position_embedding == "rope":
      need(self.head_dim % 2 == 0, f"RoPE needs an even head_dim, got {self.head_dim}")


def _positive_int(value: Any) -> bool:
  return isinstance(value, int) and value > 0


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(f"ModelConfig: {name} must be one of {choices}, got {value!r}")
