"""`ablax sample --model_dir DIR --prompt TEXT`: continue prompts with a model.

Decodes with the key/value cache (core/eval/sampling.py): greedy by default
(--temperature 0), or sampled with --temperature, --top_k and --top_p. Each
prompt is encoded with the model's tokenizer (or --tokenizer) with BOS in
front, and generation stops at the tokenizer's EOS. --no_cache recomputes the
full forward pass at every step (slow; the reference the cache is tested
against); --timing runs once untimed first so the reported speed excludes
compilation.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model_dir", required=True, help="ablax model directory")
  parser.add_argument(
    "--prompt", action="append", required=True, help="text to continue (repeat for a batch)"
  )
  parser.add_argument("--tokenizer", help="SentencePiece .model file (default: the model's)")
  parser.add_argument(
    "--max_new_tokens", type=int, default=64, help="tokens to generate per prompt"
  )
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  parser.add_argument(
    "--top_k", type=int, default=None, help="sample among the k most likely tokens (default: all)"
  )
  parser.add_argument(
    "--top_p",
    type=float,
    default=None,
    help="nucleus sampling: the smallest set of tokens with this probability (default: all)",
  )
  parser.add_argument("--seed", type=int, default=0, help="seed of the sampling RNG")
  parser.add_argument("--no_bos", action="store_true", help="do not prepend BOS to the prompts")
  parser.add_argument(
    "--ignore_eos", action="store_true", help="always generate max_new_tokens tokens"
  )
  parser.add_argument(
    "--no_cache",
    action="store_true",
    help="recompute the full forward pass every step (reference, slow)",
  )
  parser.add_argument(
    "--timing",
    action="store_true",
    help="warm up (compile) first and report tokens/s of a second run",
  )
  parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
  from core.eval import sampling
  from core.model_dir.load import load_model_dir

  # Bad input (core.errors.UserError) is reported by launch/cli.py as one line, exit 2.
  model, _, tok, _ = load_model_dir(args.model_dir, args.tokenizer, where="sample")
  prompts = [
    tok.encode(p) if args.no_bos or tok.bos_id < 0 else [tok.bos_id] + tok.encode(p)
    for p in args.prompt
  ]
  beyond = sampling.past_context(model.config, prompts, args.max_new_tokens)
  if beyond:
    print(f"ablax sample: warning: {beyond}", file=sys.stderr)
  kwargs = dict(
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    seed=args.seed,
    eos_id=None if args.ignore_eos else tok.eos_id,
    pad_id=max(tok.pad_id, 0),
    use_cache=not args.no_cache,
    vocab_limit=tok.vocab_size,
  )
  if args.timing:
    sampling.generate(model, prompts, **kwargs)
  gen = sampling.generate(model, prompts, **kwargs)
  texts = [tok.decode(t) for t in gen.tokens]
  speed = gen.num_tokens / gen.seconds if gen.seconds > 0 else float("nan")
  if args.json:
    print(
      json.dumps(
        {
          "model_dir": str(args.model_dir),
          "samples": [
            {"prompt": p, "completion": c, "ids": t, "stopped_at_eos": s}
            for p, c, t, s in zip(args.prompt, texts, gen.tokens, gen.stopped)
          ],
          "seconds": gen.seconds,
          "tokens_per_second": speed,
          "cache": not args.no_cache,
          "includes_compilation": not args.timing,
        }
      )
    )
    return 0
  for p, c in zip(args.prompt, texts):
    print(p + c)
    print("-" * 40)
  note = "" if args.timing else " (includes compilation; --timing excludes it)"
  print(
    f"{gen.num_tokens} tokens in {gen.seconds:.3f} s: {speed:.1f} tokens/s, "
    f"cache {'off' if args.no_cache else 'on'}{note}",
    file=sys.stderr,
  )
  return 0
