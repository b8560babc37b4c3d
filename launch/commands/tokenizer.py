"""`ablax tokenizer`: train, subset and show SentencePiece models.

ablax tokenizer train --input 'corpus/*.txt' --vocab_size 8192 --model_type bpe --out tok.model
ablax tokenizer train --embedded --vocab_size 4096 --out tok.model
ablax tokenizer subset --base tok.model --size 2048 --out tok2k.model
ablax tokenizer show tok.model --text 'def f(x):\\n\\treturn 42'
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
  train = sub.add_parser(
    "train",
    help="train a SentencePiece model (split digits, byte fallback, whitespace kept, turn tokens)",
  )
  train.add_argument(
    "--input", action="append", default=[], help="text/JSONL files, globs or folders (repeatable)"
  )
  train.add_argument(
    "--embedded",
    action="store_true",
    help="train on the embedded corpus (train split, code and prose)",
  )
  train.add_argument("--text_field", default="text", help="JSONL field with the text")
  train.add_argument(
    "--vocab_size", type=int, required=True, help="pieces in the model, specials included"
  )
  train.add_argument(
    "--model_type",
    choices=("bpe", "unigram"),
    default="bpe",
    help="SentencePiece algorithm (LLaMA and Gemma use bpe)",
  )
  train.add_argument(
    "--max_sentences", type=int, default=300_000, help="lines sampled for training (0 = all)"
  )
  train.add_argument("--seed", type=int, default=0, help="seed of the sentence sample")
  train.add_argument(
    "--no_split_digits",
    action="store_true",
    help="keep runs of digits together (the papers split them)",
  )
  train.add_argument(
    "--no_byte_fallback",
    action="store_true",
    help="map unknown characters to <unk> instead of UTF-8 bytes",
  )
  train.add_argument("--out", required=True, help="model file to write")

  subset = sub.add_parser("subset", help="a vocabulary subset of a model, with its id map")
  subset.add_argument(
    "--base", required=True, help="the base model file, or 'default' for the default tokenizer"
  )
  subset.add_argument(
    "--size",
    type=int,
    required=True,
    help="vocabulary size of the subset (specials, bytes and single characters included)",
  )
  subset.add_argument("--out", required=True, help="model file to write (+ .idmap.json)")

  show = sub.add_parser("show", help="a model's specials and sizes, or how it tokenizes a text")
  show.add_argument(
    "model", nargs="?", default=None, help="model file (default: the default tokenizer)"
  )
  show.add_argument(
    "--text", default=None, help="tokenize this text (\\n and \\t mean newline and tab)"
  )
  show.add_argument("--json", action="store_true", help="print JSON")


def _train(args: argparse.Namespace) -> int:
  from core.data import builders  # pylint: disable=g-import-not-at-top
  from core.tokenizer import train_tokenizer  # pylint: disable=g-import-not-at-top

  if bool(args.input) == args.embedded:
    print("ablax tokenizer train: give --input FILES or --embedded", file=sys.stderr)
    return 2
  if args.embedded:
    from core.data.sources import Embedded  # pylint: disable=g-import-not-at-top

    texts = []
    for domain in ("code", "prose"):
      source = Embedded(domain=domain).open("train")
      texts.extend(source[i] for i in range(len(source)))
  else:
    paths = builders.expand_paths(args.input)
    docs = builders.read_local_documents(paths, text_field=args.text_field, validation_percent=0)
    texts = [d["text"] for split in docs.values() for d in split]
  from core import progress  # pylint: disable=g-import-not-at-top

  with progress.status(
    f"training a {args.vocab_size}-piece {args.model_type} model on {len(texts)} documents"
  ):
    tok = train_tokenizer(
      texts,
      args.out,
      vocab_size=args.vocab_size,
      model_type=args.model_type,
      split_digits=not args.no_split_digits,
      byte_fallback=not args.no_byte_fallback,
      max_sentences=args.max_sentences,
      seed=args.seed,
    )
  print(f"wrote {tok.path} ({tok.vocab_size} ids, sha256 {tok.sha256[:12]})")
  return 0


def _subset(args: argparse.Namespace) -> int:
  from core.data.default_tokenizer import default_tokenizer  # pylint: disable=g-import-not-at-top
  from core.tokenizer import subset_tokenizer  # pylint: disable=g-import-not-at-top

  base = default_tokenizer().path if args.base == "default" else args.base
  result = subset_tokenizer(base, args.size, args.out)
  print(
    f"wrote {result.tokenizer.path} ({result.tokenizer.vocab_size} ids) and "
    f"{result.id_map_path} (gather embedding rows with kept_ids)"
  )
  return 0


def _show(args: argparse.Namespace) -> int:
  from core.data.default_tokenizer import default_tokenizer  # pylint: disable=g-import-not-at-top
  from core.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

  tok = load_tokenizer(args.model) if args.model else default_tokenizer()
  info = {
    "path": tok.path,
    "sha256": tok.sha256,
    "vocab_size": tok.vocab_size,
    "pad_id": tok.pad_id,
    "bos_id": tok.bos_id,
    "eos_id": tok.eos_id,
    "unk_id": tok.unk_id,
    "start_of_turn_id": tok.start_of_turn_id,
    "end_of_turn_id": tok.end_of_turn_id,
    "model_type": _model_type(tok),
  }
  if args.text is not None:
    # '\n' and '\t' as typed on a command line mean newline and tab.
    text = args.text.replace("\\n", "\n").replace("\\t", "\t")
    ids = tok.encode(text)
    info.update(
      ids=ids, pieces=[tok.id_to_piece(i) for i in ids], round_trip=tok.decode(ids) == text
    )
  if args.json:
    print(json.dumps(info, indent=1))
  else:
    for key, value in info.items():
      print(f"{key:>16}: {value}")
  return 0


def _model_type(tok) -> str:
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  proto = sentencepiece_model_pb2.ModelProto()
  with open(tok.path, "rb") as f:
    proto.ParseFromString(f.read())
  return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()


def run(args: argparse.Namespace) -> int:
  # Bad input (core.errors.UserError) is reported by launch/cli.py as one line, exit 2.
  action = {"train": _train, "subset": _subset, "show": _show}[args.action]
  return action(args)
