"""`ablax data inspect`: what a data pipeline delivers.

  ablax data inspect --gin_file gin/data/embedded.gin
  ablax data inspect --gin_file gin/data/embedded_staged.gin --step 1000 --batches 4

Prints the documents per source, tokens and padding in a few batches, the share
of each source (domain) in them, and a few rows decoded with their segment
boundaries.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from launch import gin_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
  inspect = sub.add_parser("inspect", help="documents, tokens, domain shares and decoded rows")
  gin_config.add_arguments(inspect, files_help="data gin file (default gin/data/embedded.gin)")
  inspect.add_argument(
    "--split", choices=("train", "validation"), default="train", help="which split to read"
  )
  inspect.add_argument("--batch_size", type=int, default=8, help="rows per batch")
  inspect.add_argument("--batches", type=int, default=4, help="batches to read")
  inspect.add_argument("--seed", type=int, default=0, help="the data order's seed")
  inspect.add_argument(
    "--step",
    type=int,
    default=0,
    help="start at this step (to see a later stage of a staged mixture); the "
    "batches before it are read and skipped",
  )
  inspect.add_argument("--rows", type=int, default=2, help="rows to decode")
  inspect.add_argument("--chars", type=int, default=400, help="characters shown per decoded row")
  inspect.add_argument("--json", action="store_true", help="print the summary as JSON")


def inspect_pipeline(args: argparse.Namespace) -> dict:
  import gin  # pylint: disable=g-import-not-at-top
  from core.data import pipeline  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  files = args.gin_file or ["gin/data/embedded.gin"]
  gin_config.add_search_paths(args.gin_search_paths)
  gin_config.parse(files, args.gin_param)
  batches = gin_config.build(
    pipeline.lm_batches, files, batch_size=args.batch_size, seed=args.seed, split=args.split
  )
  for _ in range(args.step):
    next(batches, None)
  start_tokens = batches.tokens_by_source
  seen, real, rows = 0, 0, []
  for batch in batches:
    seen += batch["inputs"].size
    real += int((batch["segment_ids"] > 0).sum())
    for r in range(batch["inputs"].shape[0]):
      if len(rows) < args.rows:
        rows.append(_decode_row(batches.tokenizer, batch, r, args.chars))
    if batches.step - args.step >= args.batches:
      break
  end_tokens = batches.tokens_by_source
  delivered = {n: end_tokens[n] - start_tokens[n] for n in end_tokens}
  total = sum(delivered.values()) or 1
  return {
    "gin_files": files,
    "split": args.split,
    "documents": {n: len(s) for n, s in batches._sources.items()},  # pylint: disable=protected-access
    "tokenizer": {"path": batches.tokenizer.path, "vocab_size": batches.tokenizer.vocab_size},
    "seq_len": batches.seq_len,
    "steps": [args.step, batches.step],
    "weights": batches.schedule.weights_at(args.step),
    "tokens": int(real),
    "padding_share": float(1 - real / seen) if seen else 0.0,
    "token_share": {n: round(v / total, 4) for n, v in delivered.items()},
    "rows": rows,
    "mean_segments_per_row": float(np.mean([r["segments"] for r in rows])) if rows else 0.0,
  }


def _decode_row(tokenizer, batch, r: int, chars: int) -> dict:
  segments = batch["segment_ids"][r]
  texts = []
  for s in [s for s in np.unique(segments) if s > 0]:
    texts.append(tokenizer.decode(batch["inputs"][r][segments == s]))
  text = " ‖ ".join(texts)
  return {
    "segments": int(segments.max()),
    "text": text[:chars] + ("…" if len(text) > chars else ""),
  }


def run(args: argparse.Namespace) -> int:
  # Bad input (core.errors.UserError) is reported by launch/cli.py as one line, exit 2.
  summary = inspect_pipeline(args)
  if args.json:
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    return 0
  print(
    f"gin files: {', '.join(summary['gin_files'])}   split: {summary['split']}   "
    f"seq_len: {summary['seq_len']}   steps {summary['steps'][0]}..{summary['steps'][1]}"
  )
  print(f"tokenizer: {summary['tokenizer']['path']} ({summary['tokenizer']['vocab_size']} ids)")
  print(f"{'source':<16} {'documents':>10} {'weight':>8} {'token share':>12}")
  for name, docs in summary["documents"].items():
    print(
      f"{name:<16} {docs:>10,} {summary['weights'][name]:>8.3f} "
      f"{summary['token_share'][name]:>12.3f}"
    )
  print(f"tokens: {summary['tokens']:,}   padding: {summary['padding_share']:.2%}")
  for k, row in enumerate(summary["rows"]):
    print(f"\n--- row {k} ({row['segments']} segments, ‖ marks a document boundary) ---")
    print(row["text"])
  return 0
