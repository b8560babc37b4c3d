"""How well a training batch mixes documents: interleaved lanes against packing in order.

For the embedded corpus at the quickstart's shape (8 x 128 tokens), each batch's
largest share of tokens from any one document and its number of documents,
over the first N batches, for `interleave` 1 (documents strictly in order)
and the default. A long stdlib module read in order fills whole batches, so
every variant's train loss moves with that file; interleaved, a document is at
most one row in each batch of up to 16 rows.

  python bench/data_mixing.py [--batches 240] [--interleave 1 16]
"""

from __future__ import annotations

import argparse
import statistics

from core.data import pipeline


class _Counting(pipeline.LMBatches):
  """LMBatches that records the pieces of the current batch: (document, offset before it)."""

  def __init__(self, **kwargs):
    self.pieces: list[tuple[str, list, int]] = []
    super().__init__(**kwargs)

  def _next_piece(self, weights, lane):
    found = super()._next_piece(weights, lane)
    if found is not None:
      name, used = found
      doc = self._open[name][used]  # [tokens, offset, record]; the loop advances doc[1]
      self.pieces.append((name, doc, doc[1]))
    return found


def batch_shares(it: _Counting) -> dict[tuple[str, int], int]:
  """Tokens per document (source, record) in the batch just read."""
  out: dict[tuple[str, int], int] = {}
  for i, (name, doc, offset) in enumerate(it.pieces):
    # A piece ends where the document's next piece starts, else where the document stands now.
    end = next((o for _, d, o in it.pieces[i + 1 :] if d is doc), doc[1])
    key = (name, doc[2])
    out[key] = out.get(key, 0) + end - offset
  return out


def measure(interleave: int, batches: int, batch_size: int, seq_len: int) -> dict[str, float]:
  it = _Counting(
    sources={"code": "embedded:code", "prose": "embedded:prose"},
    tokenizer=None,
    seq_len=seq_len,
    batch_size=batch_size,
    seed=0,
    interleave=interleave,
  )
  total = batch_size * seq_len
  top_shares, counts = [], []
  for _ in range(batches):
    it.pieces = []
    next(it)
    shares = batch_shares(it)
    assert sum(shares.values()) == total, (sum(shares.values()), total)
    top_shares.append(max(shares.values()) / total)
    counts.append(len(shares))
  return {
    "median_top_share": statistics.median(top_shares),
    "max_top_share": max(top_shares),
    "batches_one_doc_over_half": sum(s > 0.5 for s in top_shares) / batches,
    "median_documents": statistics.median(counts),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=240)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--interleave", type=int, nargs="+", default=[1, 16])
  args = parser.parse_args()
  print(f"{args.batches} batches of {args.batch_size} x {args.seq_len} tokens, embedded corpus")
  print("interleave  median top share  max top share  batches >50% one doc  median documents")
  for k in args.interleave:
    m = measure(k, args.batches, args.batch_size, args.seq_len)
    print(
      f"{k:10d}  {m['median_top_share']:16.3f}  {m['max_top_share']:13.3f}  "
      f"{m['batches_one_doc_over_half']:20.3f}  {m['median_documents']:16.0f}"
    )


if __name__ == "__main__":
  main()
