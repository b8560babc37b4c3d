"""Training SentencePiece models with the options of the Gemma and LLaMA papers.

Both papers' tokenizers split digits into single tokens, fall back to UTF-8
bytes for unknown characters (so nothing is ever <unk>), and keep whitespace as
written (code depends on it). We add identity normalization and no dummy prefix
so that decode(encode(x)) == x exactly, the special ids in Gemma's layout, the
turn-formatting tokens, and '\\n' and '\\t' as user-defined symbols: SentencePiece
reads its input line by line and would otherwise never see a newline.

Training is deterministic: when the corpus has more lines than `max_sentences`,
we pick the lines ourselves with a seeded generator instead of letting
SentencePiece shuffle.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from core.tokenizer.spm import (
  BOS_ID,
  END_OF_TURN,
  EOS_ID,
  PAD_ID,
  START_OF_TURN,
  UNK_ID,
  Tokenizer,
  TokenizerError,
)

MODEL_TYPES = ("bpe", "unigram")
# Turn formatting first so these ids do not depend on the vocabulary size.
DEFAULT_USER_SYMBOLS = (START_OF_TURN, END_OF_TURN, "\n", "\t")
# Longest line SentencePiece keeps, in bytes (its default, 4192, drops long code lines).
MAX_SENTENCE_BYTES = 16384


def corpus_lines(texts: Iterable[str]) -> list[str]:
  """The non-empty lines of the documents, the unit SentencePiece trains on."""
  return [line for text in texts for line in text.split("\n") if line]


def sample_lines(lines: Sequence[str], max_sentences: int, seed: int) -> list[str]:
  """At most `max_sentences` lines, chosen by `seed`, in corpus order."""
  if max_sentences <= 0 or len(lines) <= max_sentences:
    return list(lines)
  keep = np.sort(np.random.default_rng(seed).choice(len(lines), max_sentences, replace=False))
  return [lines[i] for i in keep]


def train_tokenizer(
  texts: Iterable[str],
  out_path: str | os.PathLike,
  *,
  vocab_size: int,
  model_type: str = "bpe",
  split_digits: bool = True,
  byte_fallback: bool = True,
  user_defined_symbols: Sequence[str] = DEFAULT_USER_SYMBOLS,
  character_coverage: float = 0.9995,
  max_sentences: int = 300_000,
  seed: int = 0,
  num_threads: int = 2,
) -> Tokenizer:
  """Trains a SentencePiece model on `texts` and writes it to `out_path`.

  Args:
    texts: documents; newlines inside them are kept as the '\\n' symbol.
    out_path: the model file to write (replaced atomically).
    vocab_size: number of ids, specials and bytes included.
    model_type: 'bpe' (LLaMA) or 'unigram'.
    split_digits, byte_fallback: the papers' options (both on by default).
    user_defined_symbols: pieces always kept whole, after pad/eos/bos/unk.
    character_coverage: share of characters covered by pieces; the rest falls
      back to bytes.
    max_sentences: cap on training lines, sampled with `seed` (keeps training
      time bounded and the result reproducible).
    seed: seed of the line sample.
    num_threads: SentencePiece trainer threads.

  Returns:
    The trained tokenizer, loaded from `out_path`.
  """
  if model_type not in MODEL_TYPES:
    raise TokenizerError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
  lines = sample_lines(corpus_lines(texts), max_sentences, seed)
  if not lines:
    raise TokenizerError(
      "the training corpus is empty (no non-empty lines); give files or documents with text in them"
    )
  n_specials = 4 + len(user_defined_symbols) + (256 if byte_fallback else 0)
  if vocab_size <= n_specials:
    raise TokenizerError(
      f"vocab_size {vocab_size} leaves no room for learned pieces: the "
      f"specials, user-defined symbols and byte pieces take {n_specials} ids"
    )
  model = io.BytesIO()
  spm.set_random_generator_seed(seed)
  try:
    spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(lines),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      split_digits=split_digits,
      byte_fallback=byte_fallback,
      remove_extra_whitespaces=False,
      normalization_rule_name="identity",
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      pad_id=PAD_ID,
      eos_id=EOS_ID,
      bos_id=BOS_ID,
      unk_id=UNK_ID,
      pad_piece="<pad>",
      eos_piece="<eos>",
      bos_piece="<bos>",
      unk_piece="<unk>",
      user_defined_symbols=list(user_defined_symbols),
      character_coverage=character_coverage,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      max_sentence_length=MAX_SENTENCE_BYTES,
      num_threads=num_threads,
      minloglevel=2,
    )
  except RuntimeError as e:
    message = str(e)
    if "Vocabulary size" in message and "too high" in message:
      raise TokenizerError(
        f"the corpus is too small for vocab_size={vocab_size}: {message.strip()} "
        "Lower --vocab_size or give more text."
      ) from None
    raise TokenizerError(f"SentencePiece training failed: {message.strip()}") from None
  write_atomic(out_path, model.getvalue())
  return Tokenizer(out_path)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` so that readers see the old file or the whole new one, never a part."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
