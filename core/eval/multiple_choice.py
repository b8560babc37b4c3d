"""Few-shot multiple choice, scored the way the LLaMA paper scores it.

Each example is a context and a few completions, one correct. The model picks
the completion with the highest score (LLaMA, section 3, after Gao et al. 2021
and Brown et al. 2020):

  'char'           log P(completion | context) / number of characters of the
                   completion (the default);
  'unconditional'  log P(completion | context) - log P(completion | "Answer:"),
                   i.e. P(completion|context) / P(completion|"Answer:") (LLaMA
                   uses it for OpenBookQA and BoolQ);
  'token'          per-token mean log-probability;
  'none'           the plain sum.

All of them come out of one pass (the unconditional one needs a second pass
over the completions and runs when asked for), and each is reported as
`acc_<name>`; `acc` is the task's primary one.

k-shot prompts put k solved examples (context + correct completion), drawn
from the task's shot pool with a seed, before the context, separated by blank
lines. Tasks come from local JSONL files (`read_jsonl`, schema in README.md)
or from prepared TFDS datasets by name (core/eval/mc_tasks.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from flax import nnx

from core.errors import UserError
from core.eval.score import token_logprobs

NORMALIZATIONS = ("char", "unconditional", "token", "none")
UNCONDITIONAL_PROMPT = "Answer:"


class TaskError(UserError, ValueError):
  """A task that cannot be read or scored; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One question: completions[i] follows contexts[i]; `label` indexes the right one.

  Most tasks share one context across choices; partial scoring (Winogrande)
  gives each choice its own context and one shared completion.
  """
  contexts: tuple[str, ...]
  completions: tuple[str, ...]
  label: int

  def __post_init__(self):
    if len(self.contexts) != len(self.completions) or len(self.completions) < 2:
      raise TaskError(f"an example needs >= 2 choices and one context per choice, got "
                      f"{len(self.contexts)} contexts and {len(self.completions)} completions")
    if not 0 <= self.label < len(self.completions):
      raise TaskError(f"label {self.label} is not an index of the {len(self.completions)} choices")

  @classmethod
  def shared(cls, context: str, completions: Sequence[str], label: int) -> "Example":
    return cls(tuple([context] * len(completions)), tuple(completions), int(label))

  def solved(self) -> str:
    """The example with its right answer, as a shot of a k-shot prompt."""
    return self.contexts[self.label] + self.completions[self.label]


@dataclasses.dataclass(frozen=True)
class Task:
  """A multiple-choice task.

  Attributes:
    name: used in metric names.
    examples: what is scored.
    shots: the pool k-shot examples are drawn from (a training split); empty
      means the other examples of `examples`.
    normalization: the primary score (one of NORMALIZATIONS).
  """
  name: str
  examples: tuple[Example, ...]
  shots: tuple[Example, ...] = ()
  normalization: str = "char"

  def __post_init__(self):
    if self.normalization not in NORMALIZATIONS:
      raise TaskError(f"normalization must be one of {NORMALIZATIONS}, got "
                      f"{self.normalization!r}")


# -- local JSONL -----------------------------------------------------------------


def read_jsonl(path: str | os.PathLike, separator: str = " ") -> list[Example]:
  """Examples from a JSONL file, one object per line.

  Schema: {"context": str, "choices": [str, ...], "label": int}, or "contexts"
  (one per choice) and "completion" (one shared) for partial scoring. Each
  choice is appended to its context after `separator` (a space by default,
  so 'The capital of France is' + ' ' + 'Paris').
  """
  path = Path(path)
  if not path.is_file():
    raise TaskError(f"task file not found: {path}")
  examples = []
  with path.open(encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{n}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise TaskError(f"{where}: not JSON ({e})") from None
      examples.append(example_from_row(row, where, separator))
  if not examples:
    raise TaskError(f"{path} holds no examples")
  return examples


def example_from_row(row: Any, where: str, separator: str = " ") -> Example:
  """An Example from one JSONL object (see read_jsonl)."""
  if not isinstance(row, dict):
    raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
  label = row.get("label")
  if not isinstance(label, int) or isinstance(label, bool):
    raise TaskError(f"{where}: 'label' must be an int index into the choices, got {label!r}")
  try:
    if "contexts" in row:
      contexts = [_need_str(c, where, "contexts") for c in row["contexts"]]
      completion = separator + _need_str(row.get("completion"), where, "completion")
      return Example(tuple(contexts), tuple([completion] * len(contexts)), label)
    choices = row.get("choices")
    if not isinstance(choices, list):
      raise TaskError(f"{where}: 'choices' must be a list of strings, got {choices!r}")
    context = _need_str(row.get("context"), where, "context")
    return Example.shared(context, [separator + _need_str(c, where, "choices") for c in choices],
                          label)
  except TaskError as e:
    if str(e).startswith(where):
      raise
    raise TaskError(f"{where}: {e}") from None


def _need_str(value: Any, where: str, field: str) -> str:
  if not isinstance(value, str):
    raise TaskError(f"{where}: '{field}' must hold strings, got {value!r}")
  return value


# -- prompts ---------------------------------------------------------------------------


def fewshot_prefix(task: Task, index: int, num_shots: int, seed: int) -> str:
  """The k solved examples in front of example `index` ('' for zero-shot)."""
  if num_shots <= 0:
    return ""
  pool = task.shots or task.examples
  candidates = [i for i in range(len(pool)) if task.shots or i != index]
  if len(candidates) < num_shots:
    raise TaskError(f"{task.name}: {num_shots}-shot needs {num_shots} shot examples, the pool "
                    f"has {len(candidates)}")
  rng = np.random.default_rng([seed, index])
  picked = rng.choice(len(candidates), size=num_shots, replace=False)
  return "".join(pool[candidates[i]].solved() + "\n\n" for i in picked)


# -- scoring ------------------------------------------------------------------------------


def _bucket(length: int) -> int:
  # Few distinct padded lengths: few compilations.
  size = 16
  while size < length:
    size *= 2
  return size


def completion_logprobs(model: nnx.Module, requests: Sequence[tuple[list[int], list[int]]],
                        batch_size: int = 16, max_len: int | None = None) -> np.ndarray:
  """log P(completion | context) for each (context ids, completion ids); float64 (n,).

  Contexts are cut from the left when context + completion exceeds `max_len`.
  Rows are right-padded to a power-of-two length (causal models never look
  right) and grouped by it, so a task compiles a handful of shapes.
  """
  seqs, starts = [], []
  for ctx, comp in requests:
    if not comp:
      raise TaskError("a completion encodes to no tokens; every choice needs text")
    if not ctx:
      raise TaskError("a context encodes to no tokens; prepend BOS")
    if max_len is not None and len(ctx) + len(comp) > max_len:
      keep = max_len - len(comp)
      if keep < 1:
        raise TaskError(f"a completion of {len(comp)} tokens does not fit max_len {max_len}")
      ctx = ctx[-keep:]
    seqs.append(ctx + comp)
    starts.append(len(ctx))
  out = np.zeros(len(seqs), np.float64)
  by_width: dict[int, list[int]] = {}
  for i, s in enumerate(seqs):
    width = _bucket(len(s))
    if max_len is not None:
      width = min(width, max_len)
    by_width.setdefault(width, []).append(i)
  for width, idx in sorted(by_width.items()):
    for b in range(0, len(idx), batch_size):
      chunk = idx[b:b + batch_size]
      rows = np.zeros((batch_size, width), np.int32)
      for r, i in enumerate(chunk):
        rows[r, :len(seqs[i])] = seqs[i]
      logp = token_logprobs(model, rows)  # (batch, width - 1): value j predicts id j + 1
      for r, i in enumerate(chunk):
        out[i] = float(np.sum(logp[r, starts[i] - 1:len(seqs[i]) - 1], dtype=np.float64))
  return out


def evaluate(model: nnx.Module, tokenizer: Any, task: Task, *, num_shots: int = 0, seed: int = 0,
             max_examples: int | None = None, batch_size: int = 16,
             normalizations: Sequence[str] | None = None, prefix: str = "mc",
             return_details: bool = False) -> dict[str, Any]:
  """Accuracy of `model` on `task`.

  Args:
    model: a core.model Transformer.
    tokenizer: its tokenizer (.encode, .bos_id).
    task: the Task.
    num_shots: solved examples in front of each context.
    seed: which shots each example gets.
    max_examples: score only the first n examples.
    batch_size: rows per forward pass.
    normalizations: scores to report besides the task's primary one (default:
      all but 'unconditional', which costs a second pass; always the primary).
    prefix: first part of the metric names.
    return_details: also return per-example choices under 'details'.

  Returns:
    {f'{prefix}/{task}/{k}shot/acc': primary accuracy, '.../acc_char',
     '.../acc_token', '.../acc_none', ['.../acc_unconditional'],
     '.../num_examples'}.
  """
  wanted = list(normalizations if normalizations is not None else ("char", "token", "none"))
  if task.normalization not in wanted:
    wanted.append(task.normalization)
  for n in wanted:
    if n not in NORMALIZATIONS:
      raise TaskError(f"unknown normalization {n!r}; choose from {NORMALIZATIONS}")
  examples = list(task.examples[:max_examples] if max_examples else task.examples)
  if not examples:
    raise TaskError(f"{task.name}: no examples to score")
  bos = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", -1) >= 0 else []
  max_len = model.config.max_seq_len if model.config.positions == "learned" else None

  requests, comp_ids, lengths = [], [], []
  for i, ex in enumerate(examples):
    shots = fewshot_prefix(task, i, num_shots, seed)
    for context, completion in zip(ex.contexts, ex.completions):
      comp = tokenizer.encode(completion)
      requests.append((bos + tokenizer.encode(shots + context), comp))
      comp_ids.append(comp)
      lengths.append(len(completion))
  cond = completion_logprobs(model, requests, batch_size, max_len)
  scores = {"none": cond,
            "char": cond / np.maximum(np.asarray(lengths, np.float64), 1),
            "token": cond / np.asarray([len(c) for c in comp_ids], np.float64)}
  if "unconditional" in wanted:
    anchor = bos + tokenizer.encode(UNCONDITIONAL_PROMPT)
    scores["unconditional"] = cond - completion_logprobs(
        model, [(anchor, c) for c in comp_ids], batch_size, max_len)

  name = f"{prefix}/{task.name}/{num_shots}shot"
  metrics: dict[str, Any] = {f"{name}/num_examples": float(len(examples))}
  picks: dict[str, list[int]] = {}
  for norm in wanted:
    k, right = 0, 0
    picks[norm] = []
    for ex in examples:
      choice = int(np.argmax(scores[norm][k:k + len(ex.completions)]))
      picks[norm].append(choice)
      right += choice == ex.label
      k += len(ex.completions)
    metrics[f"{name}/acc_{norm}"] = right / len(examples)
  metrics[f"{name}/acc"] = metrics[f"{name}/acc_{task.normalization}"]
  if return_details:
    metrics["details"] = [{"label": ex.label, **{n: picks[n][i] for n in wanted}}
                          for i, ex in enumerate(examples)]
  return metrics
