"""A set of evaluations run together: during training every N steps, or standalone.

`EvalSuite(...)` is a plain callable, suite(model, step) -> {metric: value}, so
the training loop (or anything else) calls it with the current model and logs
what comes back; gin binds its arguments. Data it needs (validation batches,
task files, training documents) is opened once, on the first call, and reused,
so each evaluation scores the same examples and curves are comparable.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from flax import nnx

from core.eval import heldout, memorization, multiple_choice


@dataclasses.dataclass
class EvalSuite:
  """Evaluations of one model, configured once.

  Attributes:
    tokenizer: the model's tokenizer (a core.tokenizer.Tokenizer or a path);
      multiple choice needs it, held-out bits per byte uses it (None: no bytes).
    heldout_batches: source name -> a zero-argument factory returning an
      iterable of validation batches (called at every evaluation, so each sees
      the same batches); empty: no held-out evaluation.
    heldout_max_batches: batches read per source.
    domains: source -> domain, for per-domain held-out totals.
    tasks: multiple-choice tasks: JSONL paths or TFDS task names
      (core/eval/mc_tasks.py), or Task objects.
    num_shots: k of the k-shot prompts (one value, or one per task).
    metrics: multiple-choice accuracies to report besides each task's primary
      (keys of core.eval.mc_metrics.METRICS; None: mc_metrics.DEFAULT_METRICS).
    max_examples: examples scored per task (None: all).
    tfds_data_dir: where the TFDS tasks are prepared.
    memorization_documents: a zero-argument factory of training documents (token
      ids), or None.
    memorization_max_documents: documents per memorization evaluation.
    seed: the few-shot draw.
  """

  tokenizer: Any = None
  heldout_batches: Mapping[str, Callable[[], Iterable[Mapping[str, Any]]]] = dataclasses.field(
    default_factory=dict
  )
  heldout_max_batches: int | None = 8
  domains: Mapping[str, str] | None = None
  tasks: Sequence[Any] = ()
  num_shots: int | Sequence[int] = 0
  metrics: Sequence[str] | None = None
  max_examples: int | None = 200
  tfds_data_dir: str | None = None
  memorization_documents: Callable[[], Iterable[Sequence[int]]] | None = None
  memorization_max_documents: int = 64
  seed: int = 0

  def __post_init__(self):
    if isinstance(self.tokenizer, (str, os.PathLike)):
      from core.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

      self.tokenizer = load_tokenizer(str(self.tokenizer))
    self._byte_lengths = None
    self._tasks: list[multiple_choice.Task] | None = None
    self._documents: list[list[int]] | None = None

  def tasks_loaded(self) -> list[multiple_choice.Task]:
    if self._tasks is None:
      if self.tasks and self.tokenizer is None:
        raise multiple_choice.TaskError("multiple-choice tasks need the model's tokenizer")
      self._tasks = [load_task(t, self.tfds_data_dir, self.max_examples) for t in self.tasks]
    return self._tasks

  def __call__(self, model: nnx.Module, step: int | None = None) -> dict[str, float]:
    del step  # the caller logs the metrics at its step
    metrics: dict[str, float] = {}
    if self.heldout_batches:
      if self._byte_lengths is None and self.tokenizer is not None:
        self._byte_lengths = heldout.token_byte_lengths(self.tokenizer)
      batches = {name: factory() for name, factory in self.heldout_batches.items()}
      metrics.update(
        heldout.evaluate(
          model,
          batches,
          byte_lengths=self._byte_lengths,
          domains=self.domains,
          max_batches=self.heldout_max_batches,
        )
      )
    shots = self.num_shots
    for i, task in enumerate(self.tasks_loaded()):
      k = shots if isinstance(shots, int) else shots[i]
      metrics.update(
        multiple_choice.evaluate(
          model,
          self.tokenizer,
          task,
          num_shots=k,
          seed=self.seed,
          max_examples=self.max_examples,
          metrics=self.metrics,
        )
      )
    if self.memorization_documents is not None:
      if self._documents is None:
        self._documents = [
          list(d)
          for _, d in zip(range(self.memorization_max_documents * 4), self.memorization_documents())
        ]
      metrics.update(
        memorization.evaluate(model, self._documents, max_documents=self.memorization_max_documents)
      )
    return metrics


def load_task(
  task: Any,
  tfds_data_dir: str | None = None,
  max_examples: int | None = None,
  shots_file: str | None = None,
  primary: str | None = None,
) -> multiple_choice.Task:
  """A Task from a Task, a JSONL path ('*.jsonl') or a TFDS task name.

  `primary` overrides the task's primary accuracy (JSONL tasks: 'acc_norm').
  """
  from pathlib import Path  # pylint: disable=g-import-not-at-top

  if isinstance(task, multiple_choice.Task):
    return task
  name = str(task)
  if name.endswith((".jsonl", ".json")) or Path(name).is_file():
    examples = tuple(multiple_choice.read_jsonl(name))
    shots = tuple(multiple_choice.read_jsonl(shots_file)) if shots_file else ()
    return multiple_choice.Task(Path(name).stem, examples, shots, primary=primary or "acc_norm")
  from core.eval import mc_tasks  # pylint: disable=g-import-not-at-top

  loaded = mc_tasks.load_tfds_task(name, tfds_data_dir, max_examples=max_examples)
  if primary:
    loaded = dataclasses.replace(loaded, primary=primary)
  return loaded
