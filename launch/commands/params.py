"""`ablax params`: parameter counts of a model config, computed without allocating it."""

from __future__ import annotations

import argparse
import json
import re
import sys

from core.paths import REPO_ROOT
from launch import gin_config

# Every gin/models/*.gin is a preset; the family files they include live in gin/models/base/,
# which the glob does not reach.
MODELS_DIR = REPO_ROOT / "gin" / "models"


def _preset_order(name: str) -> tuple:
  # Family first (the text before the first "_"), then sizes as numbers: gemma_2b, gemma_7b,
  # gemma2_2b, ..., gemma2_27b, llama_7b, ..., llama_65b, tiny_gemma, tiny_gemma2, tiny_llama.
  return tuple(
    tuple((0, int(c)) if c.isdigit() else (1, c) for c in re.findall(r"\d+|\D+", part))
    for part in name.split("_")
  )


def presets() -> list[str]:
  """Names of the model presets: the gin files in gin/models/, family by family, by size."""
  return sorted((p.stem for p in MODELS_DIR.glob("*.gin")), key=_preset_order)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  gin_config.add_arguments(parser, files_help="model gin file")
  parser.add_argument("--all", action="store_true", help="every preset in gin/models/")
  parser.add_argument("--json", action="store_true", help="print JSON")


def count(gin_files, gin_params) -> dict[str, int]:
  import gin
  from core.model.config import ModelConfig
  from core.model.flops import param_counts

  gin.clear_config()
  gin_config.parse(gin_files, gin_params)
  return param_counts(gin_config.build(ModelConfig, gin_files))


def run(args: argparse.Namespace) -> int:
  if args.all == bool(args.gin_file):
    print("ablax params: give --gin_file or --all", file=sys.stderr)
    return 2
  try:
    gin_config.add_search_paths(args.gin_search_paths)
    if args.all:
      results = {p: count([f"gin/models/{p}.gin"], args.gin_param) for p in presets()}
    else:
      results = {"": count(args.gin_file, args.gin_param)}
  except (gin_config.GinConfigError, ValueError) as e:
    print(f"ablax params: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(
      json.dumps(results[""] if "" in results else results, indent=None if "" in results else 2)
    )
    return 0
  print(f"{'model':<12} {'embedding':>16} {'non-embedding':>18} {'total':>18}")
  for name, c in results.items():
    print(
      f"{name or 'model':<12} {c['embedding']:>16,} {c['non_embedding']:>18,} {c['total']:>18,}"
    )
  return 0
