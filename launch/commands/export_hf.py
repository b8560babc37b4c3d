"""`ablax export-hf MODEL_DIR --out OUT_DIR`: an ablax model as a Hugging Face checkpoint.

Writes config.json, model.safetensors and the tokenizer (tokenizer.model,
tokenizer_config.json) of a Gemma, Gemma 2 or Llama model so that
transformers' AutoModelForCausalLM and AutoTokenizer load it; the inverse of
`ablax import-hf`. A model no transformers class computes exactly (post-norm,
learned positions, LayerNorm, an ungated MLP, ...) is refused with the field named.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "model_dir",
    metavar="MODEL_DIR",
    help="ablax model directory (ablax_model.json, params/, tokenizer.model)",
  )
  parser.add_argument(
    "--out", required=True, metavar="OUT_DIR", help="Hugging Face checkpoint directory to write"
  )
  parser.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an existing Hugging Face checkpoint at OUT_DIR",
  )


def run(args: argparse.Namespace) -> int:
  from core.model_dir import hf_export, io

  try:
    info = hf_export.export_hf(args.model_dir, args.out, overwrite=args.overwrite)
  except (hf_export.HFExportError, io.ModelIOError) as e:
    # One line: the multi-line parameter listings of io keep their first line and count.
    lines = str(e).splitlines()
    more = f" (+{len(lines) - 1} lines of detail)" if len(lines) > 1 else ""
    print(f"ablax export-hf: {lines[0]}{more}", file=sys.stderr)
    return 2
  config = info["config"]
  print(f"exported {info['hf_architecture']} to {info['out_dir']}")
  print(
    f"  layers {config.num_layers}, embed_dim {config.embed_dim}, heads {config.num_heads}/"
    f"{config.num_kv_heads} kv, head_dim {config.head_dim}, vocab {config.vocab_size}, "
    f"attention {'/'.join(config.attention_pattern)}, dtype {config.param_dtype}"
  )
  print(f"  tokenizer: {info['tokenizer'] or 'none in the model directory'}")
  if info["tokenizer_note"]:
    print(f"  note: {info['tokenizer_note']}")
  return 0
