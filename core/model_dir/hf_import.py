"""Hugging Face checkpoints (Gemma, Gemma 2, LLaMA) as ablax models.

Reads a directory written by transformers' `save_pretrained` (config.json and
*.safetensors, sharded or not), maps the config onto ModelConfig and the
tensors onto our parameter names. Anything our model cannot represent exactly
(RoPE scaling, biases, partial rotary dimensions, ...) is refused rather than
approximated: an imported model must compute what the original computes, which
tests/test_hf_parity.py checks token by token against transformers. The names,
layouts and conventions are core/model_dir/hf_layout.py's, shared with the exporter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from core.errors import UserError
from core.model.config import ConfigError, ModelConfig
from core.model_dir.hf_layout import (
  CONFIG_FILE,
  CONVENTIONS,
  CONVENTIONS_ALL,
  FAMILIES,
  INDEX_FILE,
  LAYER_TYPES,
  TANH_GELU,
  TIED_BY_DEFAULT,
  natural_key,
  tensor_specs,
)

_LAYER_KINDS = {hf: ours for ours, hf in LAYER_TYPES.items()}


class HFImportError(UserError, ValueError):
  """A Hugging Face checkpoint that ablax cannot represent or read; names the cause."""


# -- config ----------------------------------------------------------------------


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
  path = Path(hf_dir) / CONFIG_FILE
  if not Path(hf_dir).is_dir():
    raise HFImportError(f"Hugging Face checkpoint directory not found: {hf_dir}")
  if not path.is_file():
    raise HFImportError(f"{path} not found: not a Hugging Face model directory")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise HFImportError(f"{path}: not valid JSON ({e})") from None


def detect_family(hf_config: Mapping[str, Any]) -> str:
  """'gemma', 'gemma2' or 'llama' from model_type (or, failing that, architectures)."""
  architectures = list(hf_config.get("architectures") or [])
  model_type = hf_config.get("model_type")
  if model_type is None:
    by_arch = [f for f, a in FAMILIES.items() if a in architectures]
    if len(by_arch) != 1:
      raise HFImportError(
        f"config.json has no model_type and architectures {architectures} "
        f"name none of {sorted(FAMILIES.values())}"
      )
    return by_arch[0]
  if model_type not in FAMILIES:
    raise HFImportError(
      f"unsupported model_type {model_type!r}; ablax imports "
      f"{', '.join(sorted(FAMILIES))} ({', '.join(FAMILIES.values())})"
    )
  if architectures and FAMILIES[model_type] not in architectures:
    raise HFImportError(
      f"architectures {architectures}: ablax imports only "
      f"{FAMILIES[model_type]} checkpoints of model_type {model_type!r}"
    )
  return model_type


def _rope_base(hf: Mapping[str, Any]) -> float:
  """rope_theta, refusing every RoPE variant but the original one."""
  # transformers 5 writes rope_parameters; earlier versions rope_theta + rope_scaling.
  params = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling")
  for source, rope in (("rope_parameters", params), ("rope_scaling", scaling or {})):
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
      raise HFImportError(
        f"{source} has rope_type {kind!r}: RoPE scaling is not supported "
        "(ablax implements the original RoPE only)"
      )
  factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if factor not in (None, 1, 1.0):
    raise HFImportError(f"partial_rotary_factor {factor}: ablax rotates the whole head_dim")
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  return float(theta)


def _activation(family: str, hf: Mapping[str, Any]) -> str:
  if family == "llama":
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise HFImportError(f"hidden_act {act!r}: LLaMA import supports SwiGLU (silu) only")
    return CONVENTIONS[family]["activation"]
  if family == "gemma":
    # GemmaConfig reads hidden_act and maps the legacy 'gelu' of the released
    # checkpoints to the tanh approximation, which the models were trained with.
    act = hf.get("hidden_act") or hf.get("hidden_activation") or "gelu_pytorch_tanh"
    ok = TANH_GELU + ("gelu",)
  else:
    act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    ok = TANH_GELU
  if act not in ok:
    raise HFImportError(
      f"activation {act!r}: Gemma import supports GeGLU with the tanh GELU ({', '.join(ok)}) only"
    )
  return CONVENTIONS[family]["activation"]


def _attention_pattern(hf: Mapping[str, Any], num_layers: int) -> tuple[str, ...]:
  layer_types = hf.get("layer_types")
  if layer_types is None:
    # Gemma2Config's default (and the rule of checkpoints that predate
    # layer_types): layer i slides when i is even, i.e. (local, global, ...).
    layer_types = [
      "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
    ]
  if len(layer_types) != num_layers:
    raise HFImportError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
  unknown = sorted(set(layer_types) - set(_LAYER_KINDS))
  if unknown:
    raise HFImportError(f"layer_types {unknown} are not supported (only {', '.join(_LAYER_KINDS)})")
  kinds = tuple(_LAYER_KINDS[t] for t in layer_types)
  # Keep the shortest period that tiles the layers, as a preset would write it.
  for period in range(1, num_layers + 1):
    if all(kinds[i] == kinds[i % period] for i in range(num_layers)):
      return kinds[:period]
  return kinds


def config_from_hf(
  hf_config: Mapping[str, Any], *, dtype: str = "float32", param_dtype: str = "float32"
) -> tuple[str, ModelConfig]:
  """(family, ModelConfig) of a HF config.json dict; refuses what ablax cannot represent."""
  hf = dict(hf_config)
  family = detect_family(hf)
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise HFImportError(f"{flag}=true: ablax's projections have no biases")
  if hf.get("use_bidirectional_attention"):
    raise HFImportError("use_bidirectional_attention=true: ablax models are causal decoders")

  def need(key: str) -> Any:
    if hf.get(key) is None:
      raise HFImportError(f"config.json lacks {key!r}, needed for a {FAMILIES[family]}")
    return hf[key]

  embed_dim = int(need("hidden_size"))
  num_heads = int(need("num_attention_heads"))
  num_layers = int(need("num_hidden_layers"))
  head_dim = hf.get("head_dim") or embed_dim // num_heads
  fields: dict[str, Any] = dict(
    vocab_size=int(need("vocab_size")),
    embed_dim=embed_dim,
    num_layers=num_layers,
    num_heads=num_heads,
    num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
    head_dim=int(head_dim),
    mlp_dim=int(need("intermediate_size")),
    max_seq_len=int(hf.get("max_position_embeddings") or 8192),
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    rope_base=_rope_base(hf),
    tie_embeddings=bool(hf.get("tie_word_embeddings", TIED_BY_DEFAULT[family])),
    dtype=dtype,
    param_dtype=param_dtype,
    **CONVENTIONS_ALL,
    **dict(CONVENTIONS[family], activation=_activation(family, hf)),
  )
  if family == "gemma2":
    pattern = _attention_pattern(hf, num_layers)
    window = hf.get("sliding_window")
    if "local" in pattern and not window:
      raise HFImportError(
        f"layer_types has sliding_attention layers but sliding_window is {window!r}"
      )
    scalar = hf.get("query_pre_attn_scalar", 256)
    fields.update(
      attention_pattern=pattern,
      window=int(window) if "local" in pattern else None,
      attn_softcap=_optional_float(hf.get("attn_logit_softcapping", 50.0)),
      final_softcap=_optional_float(hf.get("final_logit_softcapping", 30.0)),
      query_pre_attn_scalar=None if scalar == fields["head_dim"] else float(scalar),
    )
  try:
    return family, ModelConfig(**fields)
  except ConfigError as e:
    raise HFImportError(f"config.json maps to an invalid ablax config: {e}") from None


def _optional_float(value: Any) -> float | None:
  return None if value is None else float(value)


# -- tensors -----------------------------------------------------------------------


class SafetensorsCheckpoint(Mapping):
  """The tensors of a checkpoint's *.safetensors files, read one at a time on access.

  Shapes come from the file headers, so the importer checks a whole checkpoint
  before reading any weights, and holds at most the converted copy in memory.
  """

  def __init__(self, files: Mapping[str, Path]):
    self._files = dict(files)  # tensor name -> shard path

  def __getitem__(self, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(self._files[name]), framework="np") as f:
      return f.get_tensor(name)

  def __iter__(self):
    return iter(self._files)

  def __len__(self) -> int:
    return len(self._files)

  def shape(self, name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(self._files[name]), framework="np") as f:
      return tuple(f.get_slice(name).get_shape())


def load_safetensors(hf_dir: str | os.PathLike) -> SafetensorsCheckpoint:
  """Every tensor of the checkpoint (via the shard index when there is one), lazily."""
  from safetensors import safe_open  # local: only the importer needs it

  root = Path(hf_dir)
  index = root / INDEX_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map") or {}
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
      raise HFImportError(f"{index} lists shards that are missing: {', '.join(missing)}")
  else:
    files = sorted(p.name for p in root.glob("*.safetensors"))
    weight_map = None
  if not files:
    bins = sorted(p.name for p in root.glob("*.bin"))
    hint = (
      f" (found {', '.join(bins)}: re-save with save_pretrained(safe_serialization=True))"
      if bins
      else ""
    )
    raise HFImportError(f"no *.safetensors files in {root}{hint}")
  where: dict[str, Path] = {}
  for name in files:
    try:
      with safe_open(str(root / name), framework="np") as f:
        keys = list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError
      raise HFImportError(f"{root / name}: not a readable safetensors file ({e})") from None
    for key in keys:
      if key in where:
        raise HFImportError(f"tensor {key!r} appears in more than one shard ({name})")
      if weight_map is not None and weight_map.get(key, name) != name:
        raise HFImportError(
          f"tensor {key!r} is in {name} but {INDEX_FILE} puts it in {weight_map[key]}"
        )
      where[key] = root / name
  if weight_map is not None:
    absent = sorted(set(weight_map) - set(where))
    if absent:
      raise HFImportError(f"{INDEX_FILE} lists tensors no shard holds: {', '.join(absent[:10])}")
  return SafetensorsCheckpoint(where)


def _shape(tensors: Mapping[str, Any], name: str) -> tuple[int, ...]:
  if isinstance(tensors, SafetensorsCheckpoint):
    return tensors.shape(name)
  return tuple(np.shape(tensors[name]))


def params_from_hf(
  family: str, config: ModelConfig, tensors: Mapping[str, Any], dtype: Any = np.float32
) -> dict[str, np.ndarray]:
  """Our flat parameter dict ('blocks/0/attn/q', ...) of `dtype` from HF tensors.

  Every HF tensor must be used exactly once and have the shape the config
  implies; the error names each offending tensor. Shapes are checked before
  any weight is read.
  """
  c = config
  n, h = c.num_heads, c.head_dim
  plan = {spec.hf_name: spec for spec in tensor_specs(family, c)}

  ignored, unexpected = [], []
  for name in tensors:
    if name in plan:
      continue
    if name.endswith("rotary_emb.inv_freq"):
      ignored.append(name)  # a cached buffer of old checkpoints, recomputed from rope_theta
    elif name == "lm_head.weight" and c.tie_embeddings:
      if not np.array_equal(tensors[name], tensors.get("model.embed_tokens.weight")):
        raise HFImportError(
          "tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight"
        )
    else:
      unexpected.append(name)
  missing = sorted(set(plan) - set(tensors), key=natural_key)
  shapes = {name: _shape(tensors, name) for name in plan if name in tensors}
  wrong = sorted(
    (
      f"{name}: shape {shape}, config.json implies {plan[name].hf_shape}"
      for name, shape in shapes.items()
      if shape != plan[name].hf_shape
    ),
    key=natural_key,
  )
  if missing or unexpected or wrong:
    lines = [f"the checkpoint's tensors do not match its config.json ({FAMILIES[family]})"]
    if missing:
      lines.append(f"  missing ({len(missing)}): {', '.join(missing)}")
    if unexpected:
      lines.append(
        f"  unexpected ({len(unexpected)}): {', '.join(sorted(unexpected, key=natural_key))}"
      )
    if wrong:
      lines.append(f"  wrong shape ({len(wrong)}):")
      lines.extend(f"    {w}" for w in wrong)
    q = shapes.get("model.layers.0.self_attn.q_proj.weight")
    if q is not None and len(q) == 2 and q[0] != n * h and q[0] % n == 0:
      lines.append(
        f"  head_dim mismatch: config.json gives head_dim {h} but q_proj has "
        f"{q[0]} rows for {n} heads, i.e. head_dim {q[0] // n}"
      )
    raise HFImportError("\n".join(lines))

  from core import progress  # pylint: disable=g-import-not-at-top

  out = {}
  for hf_name, spec in progress.track(plan.items(), "converting tensors", total=len(plan)):
    # Cast first: a bf16 checkpoint imported as float32 is exact, and the
    # layout change then runs in the target dtype, one tensor at a time.
    out[spec.name] = spec.to_ablax(np.asarray(tensors[hf_name], dtype))
  return out


# -- the whole conversion --------------------------------------------------------------


def import_hf(
  hf_dir: str | os.PathLike,
  out_dir: str | os.PathLike | None = None,
  *,
  dtype: str = "float32",
  param_dtype: str = "float32",
  overwrite: bool = False,
):
  """Converts a HF checkpoint; writes an ablax model directory when `out_dir` is given.

  Returns:
    (model, config, info): the Transformer, its ModelConfig and a dict with the
    family, the source directory, the HF architecture and the tokenizer copied.
  """
  import jax.numpy as jnp  # local: the config mapping alone needs no JAX
  from core.model_dir import io  # local: io imports the model; the config mapping does not need it

  root = Path(hf_dir).resolve()
  hf_config = read_hf_config(root)
  family, config = config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
  params = params_from_hf(
    family, config, load_safetensors(root), dtype=jnp.dtype(config.param_dtype)
  )
  model = io.model_from_params(config, params, where=f"converted tensors of {root}")
  tokenizer = root / "tokenizer.model"
  info = {
    "family": family,
    "hf_dir": str(root),
    "hf_architecture": FAMILIES[family],
    "hf_model_type": hf_config.get("model_type", family),
    "hf_dtype": hf_config.get("dtype", hf_config.get("torch_dtype")),
    "transformers_version": hf_config.get("transformers_version"),
    "tokenizer": str(tokenizer) if tokenizer.is_file() else None,
  }
  if out_dir is not None:
    io.save_model(
      out_dir,
      model,
      config,
      tokenizer_path=tokenizer if tokenizer.is_file() else None,
      metadata={"source": f"hf:{root}", "hf": info},
      overwrite=overwrite,
    )
  return model, config, info
