"""`ablax params`: parameter counts of a model config, computed without allocating it."""

from __future__ import annotations

import argparse
import json
import sys

from launch import gin_config

PRESETS = ("gemma_2b", "gemma_7b", "gemma2_2b", "gemma2_9b", "gemma2_27b",
           "llama_7b", "llama_13b", "llama_33b", "llama_65b",
           "tiny_gemma", "tiny_gemma2", "tiny_llama")


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
      results = {p: count([f"gin/models/{p}.gin"], args.gin_param) for p in PRESETS}
    else:
      results = {"": count(args.gin_file, args.gin_param)}
  except (gin_config.GinConfigError, ValueError) as e:
    print(f"ablax params: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(results[""] if "" in results else results, indent=None if "" in results else 2))
    return 0
  print(f"{'model':<12} {'embedding':>16} {'non-embedding':>18} {'total':>18}")
  for name, c in results.items():
    print(f"{name or 'model':<12} {c['embedding']:>16,} {c['non_embedding']:>18,} {c['total']:>18,}")
  return 0
