"""Memorization of training data, measured as in the Gemma report.

The model is prompted with the first `prefix_len` (50) tokens of a training
document and continues it greedily for `suffix_len` (50) tokens. The
continuation is memorized exactly when it equals the document's next 50
tokens, and approximately when their token-level edit distance is at most
10% of 50 (Gemma Team 2024, section 6; after Ippolito et al. 2022). Exact
matches count as approximate ones too. Rates are over the documents long
enough to have a prefix and a suffix.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from flax import nnx

from core.eval.sampling import generate
from core.tracking import schema


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
  """Levenshtein distance between two token sequences (insert, delete, substitute: 1)."""
  previous = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    current = [i]
    for j, y in enumerate(b, 1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
    previous = current
  return previous[-1]


def documents_from_texts(
  texts: Iterable[str], tokenizer: Any, add_bos: bool = True
) -> Iterator[list[int]]:
  """Token ids of each text, lazily, with BOS in front as in training (core.data frames docs so)."""
  bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id >= 0 else []
  return (bos + tokenizer.encode(t) for t in texts)


def evaluate(
  model: nnx.Module,
  documents: Iterable[Sequence[int]],
  *,
  prefix_len: int = 50,
  suffix_len: int = 50,
  tolerance: float = 0.1,
  batch_size: int = 16,
  max_documents: int | None = None,
  prefix: str = schema.EVAL_MEMORIZATION,
  return_details: bool = False,
) -> dict[str, Any]:
  """Exact and approximate memorization rates of `model` on `documents`.

  Args:
    model: a core.model Transformer.
    documents: token ids of training documents (as the model saw them, e.g.
      with BOS); shorter than prefix_len + suffix_len are skipped.
    prefix_len, suffix_len: prompt and continuation lengths (Gemma: 50, 50).
    tolerance: approximate match when edit distance <= tolerance * suffix_len.
    batch_size: prompts per generation call (the last batch is padded).
    max_documents: stop after this many usable documents.
    prefix: first part of the metric names.
    return_details: also return each document's distance under 'details'.

  Returns:
    {f'{prefix}/exact_rate', f'{prefix}/approximate_rate', f'{prefix}/num_documents',
     f'{prefix}/mean_edit_distance', f'{prefix}/skipped_short'}.
  """
  need = prefix_len + suffix_len
  prompts, truths, skipped = [], [], 0
  for doc in documents:
    if max_documents is not None and len(prompts) >= max_documents:
      break
    doc = [int(t) for t in doc]
    if len(doc) < need:
      skipped += 1
      continue
    prompts.append(doc[:prefix_len])
    truths.append(doc[prefix_len:need])
  metrics: dict[str, Any] = {
    f"{prefix}/num_documents": float(len(prompts)),
    f"{prefix}/skipped_short": float(skipped),
  }
  if not prompts:
    return metrics
  limit = tolerance * suffix_len
  distances = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start : start + batch_size]
    # A fixed batch shape compiles once; filler rows are dropped.
    filler = [chunk[0]] * (batch_size - len(chunk))
    gen = generate(model, chunk + filler, suffix_len, eos_id=None)
    for row, truth in zip(gen.tokens, truths[start : start + batch_size]):
      distances.append(edit_distance(row, truth))
  d = np.asarray(distances)
  metrics.update(
    {
      f"{prefix}/exact_rate": float(np.mean(d == 0)),
      f"{prefix}/approximate_rate": float(np.mean(d <= limit)),
      f"{prefix}/mean_edit_distance": float(np.mean(d)),
    }
  )
  if return_details:
    metrics["details"] = [int(x) for x in distances]
  return metrics
