"""SentencePiece tokenizers: loading, training, vocabulary subsets."""

from core.tokenizer.spm import (
  Tokenizer,
  TokenizerError,
  VocabMismatchError,
  check_vocab_matches,
  load_tokenizer,
)
from core.tokenizer.subset import gather_embedding_rows, load_id_map, subset_tokenizer
from core.tokenizer.train import train_tokenizer

__all__ = [
  "Tokenizer",
  "TokenizerError",
  "VocabMismatchError",
  "check_vocab_matches",
  "gather_embedding_rows",
  "load_id_map",
  "load_tokenizer",
  "subset_tokenizer",
  "train_tokenizer",
]
