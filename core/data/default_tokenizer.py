"""The default tokenizer: BPE trained on the embedded corpus, built on first use and cached.

It is trained on the train split of both domains (code and prose) of the
embedded standard-library corpus, with the papers' options (core/tokenizer/train.py). The
cached file is named by the corpus fingerprint, the model type and the size, so
another Python version (another corpus) gets its own tokenizer, and the same
interpreter always gets the same one. Its first build reads a fixed sample of
lines (DEFAULT_MAX_SENTENCES) to stay well under a minute on two cores.
"""

from __future__ import annotations

import os
import sys

from core import progress
from core.data import builders, sources
from core.tokenizer import Tokenizer, train_tokenizer

DEFAULT_VOCAB_SIZE = 4096
DEFAULT_MODEL_TYPE = "bpe"
DEFAULT_MAX_SENTENCES = 200_000


def default_tokenizer_path(
  cache_dir: str | os.PathLike | None = None,
  vocab_size: int = DEFAULT_VOCAB_SIZE,
  model_type: str = DEFAULT_MODEL_TYPE,
) -> str:
  """Where the default tokenizer is (or will be) cached; scans the corpus, builds nothing."""
  manifest = builders.scan_embedded()
  return str(
    builders.cache_root(cache_dir)
    / "tokenizers"
    / f"embedded-{manifest['fingerprint'][:16]}-{model_type}{vocab_size}.model"
  )


def default_tokenizer(
  cache_dir: str | os.PathLike | None = None,
  vocab_size: int = DEFAULT_VOCAB_SIZE,
  model_type: str = DEFAULT_MODEL_TYPE,
) -> Tokenizer:
  """The embedded-corpus tokenizer; built on first use (also building the corpus) and cached.

  Args:
    cache_dir: default $ABLAX_CACHE, else ~/.cache/ablax.
    vocab_size: number of ids (the tiny model presets use 4096).
    model_type: 'bpe' or 'unigram'.
  """
  path = default_tokenizer_path(cache_dir, vocab_size, model_type)
  if os.path.isfile(path):
    return Tokenizer(path)
  with builders.file_lock(builders.cache_root(cache_dir) / "tokenizers" / "build.lock"):
    if os.path.isfile(path):
      return Tokenizer(path)
    cache = None if cache_dir is None else str(cache_dir)
    texts = []
    for domain in ("code", "prose"):
      source = sources.Embedded(domain=domain, cache_dir=cache).open("train")
      texts.extend(source[i] for i in range(len(source)))
    print(
      f"training the default tokenizer ({vocab_size} {model_type} pieces, once; later runs "
      f"reuse {path})",
      file=sys.stderr,
      flush=True,
    )
    with progress.status(f"training a {vocab_size}-piece {model_type} tokenizer"):
      return train_tokenizer(
        texts,
        path,
        vocab_size=vocab_size,
        model_type=model_type,
        max_sentences=DEFAULT_MAX_SENTENCES,
        seed=0,
      )
