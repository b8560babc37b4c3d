"""`ablax score`: per-token log-probabilities of a text (or token ids) under a model.

Convention: the value printed on token i is log p(token i | tokens before it);
the first token has no value (nothing predicts it). Text is encoded with the
model's tokenizer (or --tokenizer) and, when that tokenizer has a BOS id,
BOS is prepended as Hugging Face's Gemma and LLaMA tokenizers do, so every
token of the text is scored; --no_bos turns that off. An --ids-file is scored
exactly as given (whitespace- or comma-separated integers, or a JSON list).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model_dir", required=True, help="ablax model directory")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument(
    "--text-file",
    "--text_file",
    dest="text_file",
    help="UTF-8 text to score (read whole, newlines included)",
  )
  source.add_argument(
    "--ids-file",
    "--ids_file",
    dest="ids_file",
    help="token ids to score, used verbatim (no BOS added)",
  )
  parser.add_argument("--tokenizer", help="SentencePiece .model file (default: the model's)")
  parser.add_argument(
    "--no_bos",
    "--no-bos",
    dest="no_bos",
    action="store_true",
    help="do not prepend the tokenizer's BOS to the text",
  )
  parser.add_argument("--json", action="store_true", help="print JSON")


class _Usage(UserError, ValueError):
  pass


def read_ids(path: str) -> list[int]:
  text = Path(path).read_text()
  try:
    values = json.loads(text) if text.lstrip().startswith("[") else text.replace(",", " ").split()
    return [int(v) for v in values]
  except (ValueError, TypeError) as e:
    raise _Usage(
      f"{path}: expected integers separated by whitespace or commas, or a JSON list ({e})"
    ) from None


def _load_tokenizer(path: str, model_vocab: int):
  from core.tokenizer import check_vocab_matches, load_tokenizer

  tok = load_tokenizer(path)
  # A model table larger than the tokenizer is fine (padded tables); a
  # tokenizer with more ids than the table would index past it.
  check_vocab_matches(
    tok.vocab_size, model_vocab, where=f"score: tokenizer {path}", allow_padding=True
  )
  return tok


def run(args: argparse.Namespace) -> int:
  from core.eval import score
  from core.model_dir import io
  from core.tokenizer import TokenizerError

  try:
    model, config, meta = io.load_model(args.model_dir)
    sp = None
    if args.text_file:
      tok_path = args.tokenizer or meta.get("tokenizer_path")
      if not tok_path:
        raise _Usage(f"{args.model_dir} has no tokenizer; pass --tokenizer or --ids-file")
      sp = _load_tokenizer(tok_path, config.vocab_size)
      try:
        text = Path(args.text_file).read_text(encoding="utf-8")
      except (OSError, UnicodeDecodeError) as e:
        raise _Usage(f"cannot read {args.text_file}: {e}") from None
      ids = sp.encode(text)
      if not args.no_bos:
        ids = score.with_bos(ids, sp.bos_id)
    else:
      if args.tokenizer:
        sp = _load_tokenizer(args.tokenizer, config.vocab_size)
      elif meta.get("tokenizer_path"):
        sp = _load_tokenizer(meta["tokenizer_path"], config.vocab_size)
      try:
        ids = read_ids(args.ids_file)
      except OSError as e:
        raise _Usage(f"cannot read {args.ids_file}: {e}") from None
    logprobs = score.token_logprobs(model, ids).tolist()
  except (_Usage, io.ModelIOError, score.ScoreError, TokenizerError) as e:
    print(f"ablax score: {e}", file=sys.stderr)
    return 2

  pieces = [sp.id_to_piece(i) if sp is not None and i < sp.vocab_size else None for i in ids]
  values = [None] + logprobs
  total = float(sum(logprobs))
  if args.json:
    print(
      json.dumps(
        {
          "model_dir": str(args.model_dir),
          "convention": "logprob[i] = log p(token i | tokens < i); token 0 has none",
          "bos_prepended": bool(args.text_file and not args.no_bos and sp.bos_id >= 0),
          "tokens": [
            {"index": i, "id": t, "piece": p, "logprob": lp}
            for i, (t, p, lp) in enumerate(zip(ids, pieces, values))
          ],
          "total_logprob": total,
          "num_scored": len(logprobs),
        }
      )
    )
    return 0
  print(f"{'index':>5} {'id':>8} {'logprob':>12}  piece")
  for i, (t, p, lp) in enumerate(zip(ids, pieces, values)):
    shown = "-" if lp is None else f"{lp:.6f}"
    print(f"{i:>5} {t:>8} {shown:>12}  {'' if p is None else repr(p)}")
  print(
    f"total log-probability {total:.6f} over {len(logprobs)} scored tokens "
    f"(mean {total / len(logprobs):.6f})"
  )
  return 0
