"""Packing token sequences into fixed-length rows.

A row holds pieces of documents back to back. Each piece is its own segment
(segment_ids 1, 2, ... in the row, 0 on padding) and its positions restart at 0,
so attention masks built from segment ids never mix documents. A document longer
than the room left in a row is cut there and goes on in the next row as a new
segment; training rows are therefore full, and padding only ends the last row of
a finite stream.

Targets are next tokens within the same segment. The last token of a segment
has no next token there: its target is 0 and loss_mask 0, as on padding. So a
segment of n tokens trains n - 1 predictions.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def empty_rows(num_rows: int, seq_len: int) -> dict[str, np.ndarray]:
  rows = {k: np.zeros((num_rows, seq_len), np.int32) for k in FIELDS if k != "loss_mask"}
  rows["loss_mask"] = np.zeros((num_rows, seq_len), np.float32)
  return rows


def put_piece(
  rows: dict[str, np.ndarray], row: int, start: int, segment: int, piece: np.ndarray
) -> None:
  """Writes one segment into rows[..][row, start:start + len(piece)]."""
  n = len(piece)
  end = start + n
  rows["inputs"][row, start:end] = piece
  rows["targets"][row, start : end - 1] = piece[1:]
  rows["segment_ids"][row, start:end] = segment
  rows["positions"][row, start:end] = np.arange(n, dtype=np.int32)
  rows["loss_mask"][row, start : end - 1] = 1.0


def pack_documents(documents: Iterable[Sequence[int]], seq_len: int) -> dict[str, np.ndarray]:
  """Packs whole token sequences into rows of seq_len, in order (the pipeline's rule).

  Returns a dict of (num_rows, seq_len) arrays: inputs, targets, segment_ids,
  positions (int32) and loss_mask (float32); the last row is padded.
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be at least 2 (one input and its target), got {seq_len}")
  pieces: list[tuple[int, int, np.ndarray]] = []  # (row, start, tokens)
  row, start = 0, 0
  for doc in documents:
    doc = np.asarray(doc, np.int32)
    offset = 0
    while offset < len(doc):
      take = min(len(doc) - offset, seq_len - start)
      pieces.append((row, start, doc[offset : offset + take]))
      offset += take
      start += take
      if start == seq_len:
        row, start = row + 1, 0
  num_rows = row + (start > 0)
  rows = empty_rows(num_rows, seq_len)
  segment = 0
  last_row = -1
  for r, s, piece in pieces:
    segment = segment + 1 if r == last_row else 1
    last_row = r
    put_piece(rows, r, s, segment, piece)
  return rows
