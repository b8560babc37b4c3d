"""A SentencePiece model behind the small interface the rest of ablax uses.

`Tokenizer.encode` and `decode` are exact inverses for any Unicode text, given a
model trained the way `train.py` trains them (identity normalization, whitespace
kept, no dummy prefix, byte fallback). SentencePiece itself has one hole: the
character U+2581 ('▁') is its internal stand-in for a space, so a literal '▁' in
the input would decode as ' '. `encode` therefore emits the byte-fallback pieces
of that one character, which decode to the literal character.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from core.errors import UserError

# Gemma's layout of the special ids: pad 0, eos 1, bos 2, unk 3.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
# SentencePiece's whitespace meta symbol.
_META = "\u2581"


class TokenizerError(UserError, ValueError):
  """A tokenizer that cannot be built, loaded or used; the message says what to do."""


class VocabMismatchError(TokenizerError):
  """A tokenizer whose number of ids differs from the model's embedding rows."""


def check_vocab_matches(
  tokenizer_vocab_size: int, model_vocab_size: int, where: str = "", allow_padding: bool = False
) -> None:
  """Raises VocabMismatchError unless the two vocab sizes agree.

  Args:
    tokenizer_vocab_size: ids the tokenizer can produce.
    model_vocab_size: rows of the model's embedding table.
    where: what is being checked (e.g. 'train', 'import-hf'), to prefix the message.
    allow_padding: accept a model table larger than the tokenizer (tables padded
      to a multiple of 128 for speed); ids beyond the tokenizer are never produced.
  """
  if tokenizer_vocab_size == model_vocab_size:
    return
  if allow_padding and tokenizer_vocab_size < model_vocab_size:
    return
  prefix = f"{where}: " if where else ""
  raise VocabMismatchError(
    f"{prefix}the tokenizer has {tokenizer_vocab_size} ids but the model's vocab_size is "
    f"{model_vocab_size}. Set ModelConfig.vocab_size = {tokenizer_vocab_size} (e.g. "
    f"--gin_param 'ModelConfig.vocab_size = {tokenizer_vocab_size}'), or use a tokenizer with "
    f"{model_vocab_size} ids (`ablax tokenizer train --vocab_size {model_vocab_size}` or "
    f"`ablax tokenizer subset --size {model_vocab_size}`)."
  )


def file_sha256(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


class Tokenizer:
  """A loaded SentencePiece model.

  Attributes:
    path: the model file.
    sha256: hash of the model file, to record which tokenizer a run used.
    vocab_size: number of ids.
    pad_id, bos_id, eos_id, unk_id: special ids (-1 where the model has none).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = str(Path(path).resolve())
    if not os.path.isfile(self.path):
      raise TokenizerError(
        f"no tokenizer model at {self.path}; train one with `ablax "
        "tokenizer train` or use the default (core.data.default_tokenizer)"
      )
    self.sha256 = file_sha256(self.path)
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(self.path)
    except (OSError, RuntimeError) as e:
      raise TokenizerError(f"{self.path} is not a SentencePiece model: {e}") from None
    self.vocab_size = int(self._sp.GetPieceSize())
    self.pad_id = int(self._sp.pad_id())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    self.unk_id = int(self._sp.unk_id())
    meta_bytes = [self._sp.PieceToId(f"<0x{b:02X}>") for b in _META.encode("utf-8")]
    # Without byte pieces a literal '▁' cannot be kept; encode then falls back to
    # SentencePiece's own behaviour for it.
    self._meta_ids = meta_bytes if self.unk_id not in meta_bytes else None

  def __repr__(self) -> str:
    return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"

  @property
  def start_of_turn_id(self) -> int:
    return self.piece_to_id(START_OF_TURN)

  @property
  def end_of_turn_id(self) -> int:
    return self.piece_to_id(END_OF_TURN)

  @property
  def processor(self) -> spm.SentencePieceProcessor:
    """The underlying SentencePieceProcessor, for options this class does not wrap."""
    return self._sp

  def piece_to_id(self, piece: str) -> int:
    i = int(self._sp.PieceToId(piece))
    return -1 if i == self.unk_id and piece != self._sp.IdToPiece(self.unk_id) else i

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no bos/eos added)."""
    if _META not in text or self._meta_ids is None:
      return self._sp.EncodeAsIds(text)
    ids: list[int] = []
    for k, part in enumerate(text.split(_META)):
      if k:
        ids.extend(self._meta_ids)
      if part:
        ids.extend(self._sp.EncodeAsIds(part))
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """encode() of each text; one call into SentencePiece for the common case."""
    if not any(_META in t for t in texts):
      return self._sp.Encode(list(texts), out_type=int)
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids`; control ids (pad, bos, eos) decode to nothing."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise TokenizerError(
        f"ids {bad[:5]} are outside this tokenizer's vocabulary "
        f"(0..{self.vocab_size - 1}); were they made by another tokenizer?"
      )
    return self._sp.DecodeIds(ids)

  def format_turn(self, role: str, text: str) -> str:
    """One dialogue turn in Gemma's format: '<start_of_turn>role\\ntext<end_of_turn>\\n'."""
    return f"{START_OF_TURN}{role}\n{text}{END_OF_TURN}\n"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Loads a SentencePiece model file."""
  return Tokenizer(path)
