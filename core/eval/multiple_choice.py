"""Few-shot multiple choice, scored the way lm-evaluation-harness scores it.

Each example is a context and a few completions, one correct. Every choice
becomes one request, (context, continuation), encoded as lm-eval 0.4.x's
`_encode_pair` does: trailing whitespace of the context moves to the front of
the continuation (a context ending in " " tokenizes differently, and changes
scores by tens of nats), then context + continuation is encoded as one string
and the continuation's tokens are what follows the context's own encoding.
The model's log-likelihood of the continuation, and whether greedy decoding
would produce it, are kept per choice; the accuracies are computed from those
records by core/eval/mc_metrics.py, under lm-eval's names ('acc', 'acc_norm',
'acc_mutual_info') and the LLaMA paper's ('acc_char', 'acc_unconditional',
'acc_token'), each with its standard error. 'acc_primary' repeats the task's
primary accuracy (LLaMA's choice for the TFDS tasks) so each task has one
headline number.

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

from core import progress
from core.errors import UserError
from core.eval import mc_metrics
from core.eval.score import token_scores
from core.tracking import schema

# The anchor of the LLaMA paper's 'acc_unconditional'.
UNCONDITIONAL_PROMPT = "Answer:"


class TaskError(UserError, ValueError):
  """A task that cannot be read or scored; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One question: completions[i] follows contexts[i]; `label` indexes the right one.

  Most tasks share one context across choices; partial scoring (Winogrande)
  gives each choice its own context and one shared completion.

  `choices` are the answer texts as lm-eval's `doc_to_choice` gives them, the
  length 'acc_norm' divides by: by default each completion without the one
  space in front (the delimiter of lm-eval and of read_jsonl), or, for
  partial scoring, each context (lm-eval's partial contexts are its choices).
  """

  contexts: tuple[str, ...]
  completions: tuple[str, ...]
  label: int
  choices: tuple[str, ...] = ()

  def __post_init__(self):
    if len(self.contexts) != len(self.completions) or len(self.completions) < 2:
      raise TaskError(
        f"an example needs >= 2 choices and one context per choice, got "
        f"{len(self.contexts)} contexts and {len(self.completions)} completions"
      )
    if not 0 <= self.label < len(self.completions):
      raise TaskError(f"label {self.label} is not an index of the {len(self.completions)} choices")
    if not self.choices:
      if len(set(self.contexts)) == 1:
        choices = tuple(c[1:] if c.startswith(" ") else c for c in self.completions)
      else:
        choices = self.contexts
      object.__setattr__(self, "choices", choices)
    if len(self.choices) != len(self.completions):
      raise TaskError(f"{len(self.choices)} choice texts for {len(self.completions)} completions")

  @classmethod
  def shared(
    cls, context: str, completions: Sequence[str], label: int, choices: Sequence[str] = ()
  ) -> "Example":
    return cls(tuple([context] * len(completions)), tuple(completions), int(label), tuple(choices))

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
    primary: the accuracy repeated as 'acc_primary' (a key of mc_metrics.METRICS).
  """

  name: str
  examples: tuple[Example, ...]
  shots: tuple[Example, ...] = ()
  primary: str = "acc_norm"

  def __post_init__(self):
    check_metrics([self.primary])


def check_metrics(names: Sequence[str]) -> None:
  for n in names:
    if n not in mc_metrics.METRICS:
      raise TaskError(
        f"unknown multiple-choice metric {n!r}; choose from {sorted(mc_metrics.METRICS)}"
      )


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
      return Example(tuple(contexts), tuple([completion] * len(contexts)), label, tuple(contexts))
    choices = row.get("choices")
    if not isinstance(choices, list):
      raise TaskError(f"{where}: 'choices' must be a list of strings, got {choices!r}")
    context = _need_str(row.get("context"), where, "context")
    choices = [_need_str(c, where, "choices") for c in choices]
    return Example.shared(context, [separator + c for c in choices], label, choices)
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
    raise TaskError(
      f"{task.name}: {num_shots}-shot needs {num_shots} shot examples, the pool "
      f"has {len(candidates)}"
    )
  rng = np.random.default_rng([seed, index])
  picked = rng.choice(len(candidates), size=num_shots, replace=False)
  return "".join(pool[candidates[i]].solved() + "\n\n" for i in picked)


# -- scoring ------------------------------------------------------------------------------


def encode_pair(
  tokenizer: Any, context: str, continuation: str, bos: Sequence[int]
) -> tuple[str, str, list[int], list[int]]:
  """(context, continuation, context ids, continuation ids), as lm-eval 0.4.x encodes them.

  lm_eval/api/model.py `_encode_pair` (causal models): trailing whitespace of
  the context moves to the front of the continuation, the whole string is
  encoded once, and the continuation's ids are what follows the length of the
  context's own encoding. `bos` (a list of 0 or 1 id) goes in front of both, as
  a Hugging Face tokenizer's special tokens do.
  """
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  whole = list(bos) + tokenizer.encode(context + continuation)
  ctx = list(bos) + tokenizer.encode(context)
  return context, continuation, ctx, whole[len(ctx) :]


def _bucket(length: int) -> int:
  # Few distinct padded lengths: few compilations.
  size = 16
  while size < length:
    size *= 2
  return size


def completion_logprobs(
  model: nnx.Module,
  requests: Sequence[tuple[list[int], list[int]]],
  batch_size: int = 16,
  max_len: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """(log P(completion | context) float64 (n,), is_greedy bool (n,)) per (context, completion) ids.

  is_greedy: every completion token is the model's argmax (lm-eval's is_greedy).
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
  greedy = np.zeros(len(seqs), bool)
  by_width: dict[int, list[int]] = {}
  for i, s in enumerate(seqs):
    width = _bucket(len(s))
    if max_len is not None:
      width = min(width, max_len)
    by_width.setdefault(width, []).append(i)
  chunks = [
    (width, idx[b : b + batch_size])
    for width, idx in sorted(by_width.items())
    for b in range(0, len(idx), batch_size)
  ]
  for width, chunk in progress.track(chunks, f"scoring {len(seqs)} choices"):
    rows = np.zeros((batch_size, width), np.int32)
    for r, i in enumerate(chunk):
      rows[r, : len(seqs[i])] = seqs[i]
    logp, top = token_scores(model, rows)  # (batch, width - 1): value j predicts id j + 1
    for r, i in enumerate(chunk):
      span = slice(starts[i] - 1, len(seqs[i]) - 1)
      out[i] = float(np.sum(logp[r, span], dtype=np.float64))
      greedy[i] = bool(np.all(top[r, span]))
  return out, greedy


def evaluate(
  model: nnx.Module,
  tokenizer: Any,
  task: Task,
  *,
  num_shots: int = 0,
  seed: int = 0,
  max_examples: int | None = None,
  batch_size: int = 16,
  metrics: Sequence[str] | None = None,
  prefix: str = schema.EVAL_MC,
  return_details: bool = False,
) -> dict[str, Any]:
  """Accuracies of `model` on `task` (definitions in core/eval/mc_metrics.py).

  Args:
    model: a core.model Transformer.
    tokenizer: its tokenizer (.encode, .bos_id).
    task: the Task.
    num_shots: solved examples in front of each context.
    seed: which shots each example gets.
    max_examples: score only the first n examples.
    batch_size: rows per forward pass.
    metrics: accuracies to report (keys of mc_metrics.METRICS; default
      mc_metrics.DEFAULT_METRICS); the task's primary one always.
    prefix: first part of the metric names.
    return_details: also return the per-choice records under 'details': task,
      num_shots, example, choice, label, context and continuation (as scored,
      without BOS), choice_text, loglikelihood, is_greedy, num_tokens and
      num_chars of the continuation, and loglikelihood_bos /
      loglikelihood_answer_prompt where acc_mutual_info / acc_unconditional
      were asked for.

  Returns:
    {f'{prefix}/{task}/{k}shot/{metric}': accuracy, '.../{metric}_stderr',
     '.../acc_primary', '.../acc_primary_stderr', '.../num_examples'}.
  """
  wanted = list(metrics if metrics is not None else mc_metrics.DEFAULT_METRICS)
  if task.primary not in wanted:
    wanted.append(task.primary)
  check_metrics(wanted)
  examples = list(task.examples[:max_examples] if max_examples else task.examples)
  if not examples:
    raise TaskError(f"{task.name}: no examples to score")
  bos = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", -1) >= 0 else []
  max_len = model.config.max_seq_len if model.config.position_embedding == "learned" else None

  records, requests, completions = [], [], []
  for i, ex in enumerate(examples):
    shots = fewshot_prefix(task, i, num_shots, seed)
    for j, (context, completion) in enumerate(zip(ex.contexts, ex.completions)):
      ctx_text, cont_text, ctx, cont = encode_pair(tokenizer, shots + context, completion, bos)
      requests.append((ctx, cont))
      completions.append(completion)
      records.append(
        {
          "task": task.name,
          "num_shots": num_shots,
          "example": i,
          "choice": j,
          "label": ex.label,
          "context": ctx_text,
          "continuation": cont_text,
          "choice_text": ex.choices[j],
          "num_tokens": len(cont),
          "num_chars": len(cont_text),
        }
      )
  loglikelihood, greedy = completion_logprobs(model, requests, batch_size, max_len)
  for r, ll, g in zip(records, loglikelihood, greedy):
    r["loglikelihood"], r["is_greedy"] = float(ll), bool(g)
  # The anchored continuation is the completion as the task wrote it, as in lm-eval, whose
  # unconditional requests are ("", delimiter + choice).
  anchored = {}
  if "acc_mutual_info" in wanted:
    if not bos:
      raise TaskError("acc_mutual_info conditions on BOS alone; this tokenizer has no BOS")
    # lm-eval scores a request with an empty context after its prefix token (BOS) alone.
    anchored["loglikelihood_bos"] = [(list(bos), tokenizer.encode(c)) for c in completions]
  if "acc_unconditional" in wanted:
    anchored["loglikelihood_answer_prompt"] = [
      encode_pair(tokenizer, UNCONDITIONAL_PROMPT, c, bos)[2:] for c in completions
    ]
  for field, pairs in anchored.items():
    values, _ = completion_logprobs(model, pairs, batch_size, max_len)
    for r, v in zip(records, values):
      r[field] = float(v)

  name = f"{prefix}/{task.name}/{num_shots}shot"
  scores = mc_metrics.accuracies(records, wanted)
  out: dict[str, Any] = {f"{name}/{k}": v for k, v in scores.items()}
  out[f"{name}/acc_primary"] = scores[task.primary]
  out[f"{name}/acc_primary_stderr"] = scores[f"{task.primary}_stderr"]
  out[f"{name}/num_examples"] = float(len(examples))
  if return_details:
    out["details"] = records
  return out
