"""`ablax import-hf HF_DIR --out OUT_DIR`: a Hugging Face checkpoint as an ablax model.

Reads config.json and *.safetensors of a GemmaForCausalLM, Gemma2ForCausalLM or
LlamaForCausalLM directory (as written by `save_pretrained`), converts it and
writes an ablax model directory (core/model_dir/io.py), copying tokenizer.model when
the checkpoint has one. What ablax cannot represent exactly is refused.
"""

from __future__ import annotations

import argparse

from core.model.config import DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "hf_dir", metavar="HF_DIR", help="directory with config.json and *.safetensors"
  )
  parser.add_argument(
    "--out", required=True, metavar="OUT_DIR", help="ablax model directory to write"
  )
  parser.add_argument(
    "--param_dtype",
    default="float32",
    choices=DTYPES,
    help="storage dtype of the converted weights (default float32)",
  )
  parser.add_argument(
    "--dtype",
    default="float32",
    choices=DTYPES,
    help="compute dtype recorded in the model config (default float32)",
  )
  parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")


def run(args: argparse.Namespace) -> int:
  from core.model_dir import hf_import, io

  # Bad input (core.errors.UserError) is reported by launch/cli.py as one line, exit 2.
  _, config, info = hf_import.import_hf(
    args.hf_dir, args.out, dtype=args.dtype, param_dtype=args.param_dtype, overwrite=args.overwrite
  )
  counts = io.read_manifest(args.out)["param_counts"]
  print(f"imported {info['hf_architecture']} from {info['hf_dir']}")
  print(
    f"  layers {config.num_layers}, embed_dim {config.embed_dim}, heads {config.num_heads}/"
    f"{config.num_kv_heads} kv, head_dim {config.head_dim}, vocab {config.vocab_size}, "
    f"attention {'/'.join(config.attention_pattern)}"
  )
  print(
    f"  parameters: embedding {counts['embedding']:,}, non-embedding "
    f"{counts['non_embedding']:,}, total {counts['total']:,}"
  )
  print(f"  tokenizer: {'copied' if info['tokenizer'] else 'none in the checkpoint'}")
  print(f"wrote {args.out}")
  return 0
