"""Multiple-choice accuracies from per-choice log-likelihoods, under lm-eval's names.

Every metric picks, per example, the choice with the highest score (the first
on a tie, as numpy's argmax and lm-eval do) and reports the fraction of
examples where that is the labelled one. The scores, from one per-choice
record (the rows `multiple_choice.evaluate` returns and `ablax eval --details`
writes):

  lm-evaluation-harness 0.4.x (lm_eval/api/task.py, multiple_choice):
  'acc'               loglikelihood, the plain sum over the continuation;
  'acc_norm'          loglikelihood / len(choice_text), the answer's characters
                      without the space in front of it;
  'acc_mutual_info'   loglikelihood - loglikelihood_bos, the continuation's
                      log-likelihood after BOS alone subtracted.

  LLaMA paper (section 3) variants:
  'acc_char'          loglikelihood / num_chars, the characters of the scored
                      continuation (the space in front included);
  'acc_unconditional' loglikelihood - loglikelihood_answer_prompt, the
                      continuation's log-likelihood after "Answer:" subtracted
                      (LLaMA's choice for OpenBookQA and BoolQ);
  'acc_token'         loglikelihood / num_tokens.

Each accuracy comes with '<metric>_stderr', lm-eval's `mean_stderr`: the
sample standard deviation (n - 1) of the per-example 0/1 outcomes over sqrt(n).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

Record = Mapping[str, Any]

METRICS: dict[str, Callable[[Record], float]] = {
  "acc": lambda r: r["loglikelihood"],
  # max(.., 1): an empty answer text has nothing to divide by; lm-eval would give inf.
  "acc_norm": lambda r: r["loglikelihood"] / max(len(r["choice_text"]), 1),
  "acc_mutual_info": lambda r: r["loglikelihood"] - r["loglikelihood_bos"],
  "acc_char": lambda r: r["loglikelihood"] / max(r["num_chars"], 1),
  "acc_unconditional": lambda r: r["loglikelihood"] - r["loglikelihood_answer_prompt"],
  "acc_token": lambda r: r["loglikelihood"] / r["num_tokens"],
}
# One forward pass over the contexts gives these; the other two need a pass over
# the continuations after their anchor, and run only when asked for.
DEFAULT_METRICS = ("acc", "acc_norm", "acc_char", "acc_token")


def mean_stderr(values: Sequence[float]) -> float:
  """Standard error of the mean, lm-eval's `mean_stderr` (nan for fewer than 2 values)."""
  n = len(values)
  if n < 2:
    return float("nan")
  mu = sum(values) / n
  return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def by_example(records: Iterable[Record]) -> list[list[Record]]:
  """Records grouped by their 'example' index, in the order they first appear."""
  groups: dict[int, list[Record]] = {}
  for r in records:
    groups.setdefault(int(r["example"]), []).append(r)
  return [sorted(g, key=lambda r: int(r["choice"])) for g in groups.values()]


def picks(records: Iterable[Record], metric: str) -> list[int]:
  """The chosen choice index of each example under `metric`."""
  score = METRICS[metric]
  return [int(np.argmax([score(r) for r in group])) for group in by_example(records)]


def accuracies(records: Sequence[Record], metrics: Sequence[str]) -> dict[str, float]:
  """{metric: accuracy, metric + '_stderr': its standard error} over the examples."""
  groups = by_example(records)
  labels = [int(g[0]["label"]) for g in groups]
  out = {}
  for m in metrics:
    right = [float(p == y) for p, y in zip(picks(records, m), labels)]
    out[m] = sum(right) / len(right)
    out[f"{m}_stderr"] = mean_stderr(right)
  return out


def write_details(path: str | os.PathLike, records: Iterable[Record], append: bool = False) -> None:
  """Per-choice records as JSONL, one object a line."""
  with open(path, "a" if append else "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_details(path: str | os.PathLike) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
