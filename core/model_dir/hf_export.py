"""ablax models as Hugging Face checkpoints (Gemma, Gemma 2, LLaMA), the inverse of hf_import.

Writes config.json, model.safetensors and, when the model has one, its
SentencePiece tokenizer with the tokenizer_config.json transformers needs, so
that `AutoModelForCausalLM.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)` load it. A config is written as the
family whose conventions it has (core/model_dir/hf_layout.py, the table the
importer reads too); anything no transformers class computes exactly is
refused with the field named, never approximated. tests/test_export_hf.py
checks the exported models token by token against transformers.

The exported tokenizer gives the ids of core.tokenizer's Tokenizer except
where transformers follows SentencePiece's own conventions: a literal U+2581
('▁') reads as a space, and special-token strings in the text ('<bos>')
become those tokens.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from core.model.config import ModelConfig
from core.model_dir.hf_layout import (
  ACTIVATION_KEY,
  CONFIG_FILE,
  CONVENTIONS,
  FAMILIES,
  HF_ACTIVATION,
  LAYER_TYPES,
  WEIGHTS_FILE,
  tensor_specs,
)

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
_GEMMA2_ONLY = "only Gemma 2 (norm_placement='pre_post') has"


class HFExportError(ValueError):
  """An ablax model that no transformers class represents, or that cannot be written."""


# -- config ------------------------------------------------------------------------


def family_of(config: ModelConfig) -> str:
  """'gemma', 'gemma2' or 'llama': the transformers family that computes `config` exactly.

  Raises HFExportError naming every field that no family represents.
  """
  c = config
  problems = []
  if c.norm != "rmsnorm":
    problems.append(
      f"norm={c.norm!r}: transformers' Gemma, Gemma 2 and Llama normalize with "
      "RMSNorm (norm='rmsnorm')"
    )
  if c.position_embedding != "rope":
    problems.append(
      f"position_embedding={c.position_embedding!r}: transformers' Gemma, Gemma 2 "
      "and Llama use rotary positions (position_embedding='rope')"
    )
  if c.norm_placement not in {conv["norm_placement"] for conv in CONVENTIONS.values()}:
    problems.append(
      f"norm_placement={c.norm_placement!r}: transformers' Gemma and Llama are "
      "pre-norm ('pre'), Gemma 2 is 'pre_post'"
    )
  if c.activation not in HF_ACTIVATION:
    problems.append(
      f"activation={c.activation!r}: transformers' Gemma and Llama have gated "
      "MLPs, GeGLU ('geglu', Gemma) or SwiGLU ('swiglu', Llama)"
    )
  if problems:
    raise HFExportError("cannot export as a Hugging Face checkpoint: " + "; ".join(problems))

  # The family whose conventions differ from the config's in the fewest fields.
  def mismatches(family):
    return [
      (field, want) for field, want in CONVENTIONS[family].items() if getattr(c, field) != want
    ]

  placed = [f for f in CONVENTIONS if CONVENTIONS[f]["norm_placement"] == c.norm_placement]
  family = min(placed, key=lambda f: len(mismatches(f)))
  cls = FAMILIES[family]
  wrong = mismatches(family)
  if wrong:
    have = ", ".join(f"{field}={getattr(c, field)!r}" for field, _ in wrong)
    need = ", ".join(f"{field}={want!r}" for field, want in wrong)
    problems.append(
      f"{have}: no transformers class has this combination; the closest, {cls}, needs {need}"
    )
  if family != "gemma2":
    if "local" in c.layer_kinds:
      problems.append(
        f"attention_pattern={c.attention_pattern}: {_GEMMA2_ONLY} sliding-window "
        f"('local') layers; {cls} attends globally in every layer"
      )
    for field, what in (("attn_softcap", "attention logits"), ("final_softcap", "output logits")):
      if getattr(c, field) is not None:
        problems.append(f"{field}={getattr(c, field)}: {_GEMMA2_ONLY} soft-capped {what}")
    if c.query_pre_attn_scalar not in (None, c.head_dim):
      problems.append(
        f"query_pre_attn_scalar={c.query_pre_attn_scalar}: {cls} scales queries "
        f"by head_dim ** -0.5; {_GEMMA2_ONLY} query_pre_attn_scalar"
      )
  elif c.query_pre_attn_scalar is not None and not float(c.query_pre_attn_scalar).is_integer():
    problems.append(
      f"query_pre_attn_scalar={c.query_pre_attn_scalar}: Gemma2Config takes an "
      "integer query_pre_attn_scalar"
    )
  if problems:
    raise HFExportError("cannot export as a Hugging Face checkpoint: " + "; ".join(problems))
  return family


def config_to_hf(
  config: ModelConfig,
  family: str | None = None,
  special_ids: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
  """The config.json dict of `config` as a `family` model (default: family_of(config)).

  special_ids: bos/eos/pad_token_id of the tokenizer; left out, transformers
  uses its config class's defaults.
  """
  c = config
  family = family or family_of(c)
  hf: dict[str, Any] = {
    "architectures": [FAMILIES[family]],
    "model_type": family,
    "vocab_size": c.vocab_size,
    "hidden_size": c.embed_dim,
    "intermediate_size": c.mlp_dim,
    "num_hidden_layers": c.num_layers,
    "num_attention_heads": c.num_heads,
    "num_key_value_heads": c.num_kv_heads,
    "head_dim": c.head_dim,
    ACTIVATION_KEY[family]: HF_ACTIVATION[c.activation],
    "max_position_embeddings": c.max_seq_len,
    "rms_norm_eps": c.norm_eps,
    "rope_parameters": {"rope_theta": float(c.rope_base), "rope_type": "default"},
    "tie_word_embeddings": c.tie_embeddings,
    "attention_bias": False,
    "dtype": c.param_dtype,
  }
  if family == "llama":
    hf["mlp_bias"] = False
  if family == "gemma2":
    hf.update(
      layer_types=[LAYER_TYPES[kind] for kind in c.layer_kinds],
      # Gemma2Model builds the sliding mask even when no layer uses it, so a
      # model without local layers still needs a value; the context length is inert.
      sliding_window=c.window or c.max_seq_len,
      attn_logit_softcapping=c.attn_softcap,
      final_logit_softcapping=c.final_softcap,
      query_pre_attn_scalar=int(c.query_pre_attn_scalar or c.head_dim),
    )
  hf.update(special_ids or {})
  return hf


# -- tensors ---------------------------------------------------------------------------


def hf_tensors(
  family: str, config: ModelConfig, params: Mapping[str, Any]
) -> dict[str, np.ndarray]:
  """HF tensor name -> array of our flat params ('blocks/0/attn/q', ...), dtype kept."""
  from core.model_dir import io  # local: io imports the model; the config mapping does not need it

  io.check_params(config, {n: np.shape(a) for n, a in params.items()}, "model parameters")
  return {
    spec.hf_name: spec.to_hf(np.asarray(params[spec.name])) for spec in tensor_specs(family, config)
  }


# -- tokenizer -------------------------------------------------------------------------


def _tokenizer_files(tokenizer: Path, out: Path, max_len: int) -> tuple[dict[str, Any], str | None]:
  """Writes tokenizer.model and its transformers configuration into `out`.

  Returns (the special token ids for config.json, a note on what transformers
  tokenizes differently, or None).
  """
  import sentencepiece as spm  # local: only the tokenizer part needs it
  from sentencepiece import sentencepiece_model_pb2 as model_pb2

  proto = model_pb2.ModelProto()
  try:
    proto.ParseFromString(tokenizer.read_bytes())
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
  except Exception as e:  # protobuf's DecodeError, SentencePiece's RuntimeError
    raise HFExportError(f"{tokenizer}: not a SentencePiece model ({e})") from None
  shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
  norm = proto.normalizer_spec
  special = {}
  for role in ("bos", "eos", "unk", "pad"):
    i = getattr(sp, f"{role}_id")()
    special[role] = sp.id_to_piece(i) if i >= 0 else None
  tokens = {f"{role}_token": piece for role, piece in special.items() if piece is not None}
  # GemmaTokenizer is SentencePiece without a dummy prefix (what `ablax tokenizer train`
  # writes); LlamaTokenizer prepends the '▁' that add_dummy_prefix models expect.
  if norm.add_dummy_prefix:
    settings = {"tokenizer_class": "LlamaTokenizer", "add_prefix_space": True, "legacy": False}
  else:
    # Its default '<mask>' token would be added past the model's vocabulary.
    settings = {"tokenizer_class": "GemmaTokenizer", "mask_token": None}
  tokenizer_config = dict(
    settings, **tokens, add_bos_token=True, add_eos_token=False, model_max_length=max_len
  )
  _write_json(out / TOKENIZER_CONFIG_FILE, tokenizer_config)
  _write_json(out / SPECIAL_TOKENS_FILE, tokens)
  note = None
  rule = norm.name or "identity"
  if rule != "identity" or norm.remove_extra_whitespaces:
    note = (
      f"{tokenizer.name} normalizes text ({rule}"
      f"{', remove_extra_whitespaces' if norm.remove_extra_whitespaces else ''}), which "
      f"transformers' {settings['tokenizer_class']} does not: texts it changes (e.g. runs "
      "of spaces) tokenize differently there"
    )
  ids = {
    f"{role}_token_id": (getattr(sp, f"{role}_id")() if special[role] else None)
    for role in ("bos", "eos", "pad")
  }
  return ids, note


def _write_json(path: Path, value: Any) -> None:
  path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


# -- the whole export --------------------------------------------------------------------


def write_hf(
  out_dir: str | os.PathLike,
  params: Mapping[str, Any],
  config: ModelConfig,
  *,
  tokenizer_path: str | os.PathLike | None = None,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes flat ablax `params` of `config` as a Hugging Face checkpoint directory.

  Assembled next to `out_dir` and renamed into place, so a failed export never
  leaves a directory transformers would take for complete.

  Returns:
    dict with the family, HF architecture, out_dir, tokenizer class (or None)
    and tokenizer_note (what transformers tokenizes differently, or None).
  """
  from safetensors.numpy import save_file  # local: only writing needs it

  family = family_of(config)
  out = Path(out_dir).resolve()
  if out.exists():
    if not overwrite:
      raise HFExportError(
        f"{out} already exists; choose a new directory or overwrite it (--overwrite)"
      )
    if not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_FILE).is_file()):
      raise HFExportError(
        f"{out} exists and is not a Hugging Face checkpoint directory; refusing to replace it"
      )
  tok = Path(tokenizer_path) if tokenizer_path is not None else None
  if tok is not None and not tok.is_file():
    raise HFExportError(f"tokenizer file not found: {tok}")
  tensors = hf_tensors(family, config, params)

  from core.model_dir import io  # pylint: disable=g-import-not-at-top  (see hf_tensors)

  with io.staged_directory(out) as staging:
    special_ids, note = ({}, None)
    if tok is not None:
      special_ids, note = _tokenizer_files(tok, staging, config.max_seq_len)
    # 'pt' is what transformers' loader expects in a safetensors header.
    save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
    _write_json(staging / CONFIG_FILE, config_to_hf(config, family, special_ids))
  tokenizer_class = None
  if tok is not None:
    tokenizer_class = json.loads((out / TOKENIZER_CONFIG_FILE).read_text())["tokenizer_class"]
  return {
    "family": family,
    "hf_architecture": FAMILIES[family],
    "out_dir": str(out),
    "tokenizer": tokenizer_class,
    "tokenizer_note": note,
  }


def export_hf(
  model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> dict[str, Any]:
  """Exports an ablax model directory (core/model_dir/io.py) as a Hugging Face checkpoint.

  The config is checked before any weight is read, so an unrepresentable model
  fails at once. Returns write_hf's dict plus 'config' (the ModelConfig).
  """
  from core.model_dir import io  # local: see hf_tensors

  root = Path(model_dir).resolve()
  manifest = io.read_manifest(root)
  config = io.config_from_dict(manifest.get("config") or {}, where=str(root / io.MANIFEST))
  family_of(config)
  model, config, meta = io.load_model(root)
  params = {name: np.asarray(value) for name, value in io.flat_params(model).items()}
  info = write_hf(
    out_dir, params, config, tokenizer_path=meta["tokenizer_path"], overwrite=overwrite
  )
  return dict(info, config=config)
