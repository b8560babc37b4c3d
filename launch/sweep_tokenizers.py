"""Tokenizer subsets for the vocabulary-size sweep, built on first use.

A sweep point cannot run `ablax tokenizer subset` first, so the point's gin
binds the data's tokenizer to `default_subset(size)`: the default tokenizer's
`size`-piece subset (core/tokenizer/subset.py), written once next to the
default tokenizer and reused by every point and seed. Concurrent children may
build it at the same time; the file is written atomically and the content is
a function of the base model and the size, so the race is harmless.
"""

from __future__ import annotations

from pathlib import Path


def default_subset(size: int):
  """The default tokenizer's `size`-piece subset, as a core.tokenizer.Tokenizer.

  At the default tokenizer's own size, the default tokenizer itself: a sweep's
  full-vocabulary point then trains on exactly the data its base experiment does.
  """
  from core.data.default_tokenizer import default_tokenizer  # pylint: disable=g-import-not-at-top
  from core.tokenizer.spm import Tokenizer  # pylint: disable=g-import-not-at-top
  from core.tokenizer.subset import subset_tokenizer  # pylint: disable=g-import-not-at-top
  full = default_tokenizer()
  if int(size) == full.vocab_size:
    return full
  base = Path(full.path)
  out = base.with_name(f"{base.stem}-subset{int(size)}.model")
  if not out.is_file():
    subset_tokenizer(base, int(size), out)
  return Tokenizer(out)
