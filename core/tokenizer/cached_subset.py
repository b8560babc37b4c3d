"""Tokenizer subsets for a vocabulary-size sweep, built on first use.

A sweep point cannot run `ablax tokenizer subset` first, so the point's gin
binds the data's tokenizer to `cached_subset(base, size)`: `base`'s
`size`-piece subset (core/tokenizer/subset.py), written once next to `base` and
reused by every point and seed. Concurrent children may build it at the same
time; the file is written atomically and the content is a function of the base
model and the size, so the race is harmless. The base comes in as an argument
(gin binds it to the default tokenizer, core/data/default_tokenizer.py), so the
tokenizer package does not import the data package.
"""

from __future__ import annotations

from pathlib import Path

from core.tokenizer.spm import Tokenizer
from core.tokenizer.subset import subset_tokenizer


def cached_subset(base: Tokenizer, size: int) -> Tokenizer:
  """`base`'s `size`-piece subset; `base` itself at its own size.

  At the base's own size a sweep's full-vocabulary point then trains on exactly
  the data its base experiment does.
  """
  if int(size) == base.vocab_size:
    return base
  path = Path(base.path)
  out = path.with_name(f"{path.stem}-subset{int(size)}.model")
  if not out.is_file():
    subset_tokenizer(path, int(size), out)
  return Tokenizer(out)
