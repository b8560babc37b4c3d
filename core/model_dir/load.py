"""Opening a model directory together with its tokenizer, for evaluation and sampling."""

from __future__ import annotations

import os
from typing import Any

from core.model_dir import io
from core.tokenizer import Tokenizer, check_vocab_matches, load_tokenizer


def open_tokenizer(path: str | os.PathLike, model_vocab_size: int, where: str) -> Tokenizer:
  """Loads a tokenizer and checks it can index the model's embedding table."""
  tok = load_tokenizer(path)
  # A model table larger than the tokenizer is fine (tables padded for speed);
  # a tokenizer with more ids than the table would index past it.
  check_vocab_matches(
    tok.vocab_size, model_vocab_size, where=f"{where}: tokenizer {path}", allow_padding=True
  )
  return tok


def load_model_dir(
  model_dir: str | os.PathLike,
  tokenizer: str | os.PathLike | None = None,
  need_tokenizer: bool = True,
  where: str = "eval",
) -> tuple[Any, Any, Tokenizer | None, dict[str, Any]]:
  """(model, config, tokenizer, meta) of an ablax model directory (io.load_model).

  `tokenizer` overrides the one stored with the model. Without either, and when
  `need_tokenizer`, the error says to pass one.
  """
  model, config, meta = io.load_model(model_dir)
  path = tokenizer or meta.get("tokenizer_path")
  if path is None:
    if need_tokenizer:
      raise io.ModelIOError(f"{model_dir} has no tokenizer.model; pass --tokenizer")
    return model, config, None, meta
  return model, config, open_tokenizer(path, config.vocab_size, where), meta
