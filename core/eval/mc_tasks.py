"""Multiple-choice tasks from prepared TFDS datasets, by name.

Each entry turns one TFDS record into an Example with the prompt format of
the LLaMA / GPT-3 evaluations, and names the split scored, the split shots come
from and the primary accuracy, the one the LLaMA paper reports ('acc_char',
except OpenBookQA and BoolQ: 'acc_unconditional'; core/eval/mc_metrics.py).
Every accuracy is reported either way. Winogrande uses partial scoring: each
option is substituted for the blank and the rest of the sentence is scored.

Reading goes through `builder.as_data_source` (array_record, no TensorFlow).
Nothing downloads: a dataset that is not prepared is an error saying how to
prepare it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import numpy as np

from core.eval.multiple_choice import Example, Task, TaskError


def _text(value: Any) -> str:
  # Real records hold bytes; tfds.testing.mock_data hands str.
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  return str(value)


def _texts(values: Any) -> list[str]:
  return [_text(v) for v in list(values)]


def piqa(r: Mapping[str, Any]) -> Example:
  context = f"Question: {_text(r['goal'])}\nAnswer:"
  return Example.shared(context, [" " + _text(r["sol1"]), " " + _text(r["sol2"])], int(r["label"]))


def arc(r: Mapping[str, Any]) -> Example:
  choices = r["choices"]
  labels = [int(x) for x in np.asarray(choices["label"]).reshape(-1)]
  key = int(r["answerKey"])
  if key not in labels:
    raise TaskError(f"ARC record: answerKey {key} is not among the choice labels {labels}")
  context = f"Question: {_text(r['question'])}\nAnswer:"
  return Example.shared(context, [" " + t for t in _texts(choices["text"])], labels.index(key))


def bool_q(r: Mapping[str, Any]) -> Example:
  context = f"{_text(r['passage'])}\nQuestion: {_text(r['question'])}?\nAnswer:"
  return Example.shared(context, [" no", " yes"], int(bool(r["answer"])))


def hellaswag(r: Mapping[str, Any]) -> Example:
  context = f"{_text(r['activity_label'])}: {_text(r['context'])}"
  return Example.shared(context, [" " + e for e in _texts(r["endings"])], int(r["label"]))


def openbookqa(r: Mapping[str, Any]) -> Example:
  q = r["question"]
  choices = [" " + _text(q[f"choice_{c}"]) for c in "ABCD"]
  return Example.shared(_text(q["stem"]), choices, int(r["answerKey"]))


def winogrande(r: Mapping[str, Any]) -> Example:
  sentence = _text(r["sentence"])
  if "_" not in sentence:
    raise TaskError(f"Winogrande record without a blank: {sentence!r}")
  cut = sentence.index("_")
  before, after = sentence[:cut], sentence[cut + 1 :]
  options = [_text(r["option1"]), _text(r["option2"])]
  contexts = tuple(before + o for o in options)
  # lm-eval's partial contexts are its choices (what acc_norm measures).
  return Example(contexts, (after, after), int(r["label"]), contexts)


@dataclasses.dataclass(frozen=True)
class TfdsTask:
  """How to read one TFDS dataset as a multiple-choice task."""

  tfds_name: str
  convert: Callable[[Mapping[str, Any]], Example]
  split: str
  shots_split: str | None
  primary: str = "acc_char"
  # Import that registers the builder (catalogue text datasets are lazy).
  module: str | None = None


TFDS_TASKS: dict[str, TfdsTask] = {
  "piqa": TfdsTask("piqa", piqa, "validation", "train"),
  "arc_easy": TfdsTask("ai2_arc/ARC-Easy", arc, "test", "train"),
  "arc_challenge": TfdsTask("ai2_arc/ARC-Challenge", arc, "test", "train"),
  "bool_q": TfdsTask("bool_q", bool_q, "validation", "train", "acc_unconditional"),
  "openbookqa": TfdsTask("openbookqa", openbookqa, "test", "train", "acc_unconditional"),
  "hellaswag": TfdsTask(
    "hellaswag", hellaswag, "validation", "train", module="tensorflow_datasets.text"
  ),
  "winogrande": TfdsTask(
    "winogrande", winogrande, "validation", "train_xl", module="tensorflow_datasets.text"
  ),
}
# TFDS spellings work too.
ALIASES = {
  "ai2_arc": "arc_easy",
  "ai2_arc/ARC-Easy": "arc_easy",
  "ai2_arc/ARC-Challenge": "arc_challenge",
  "boolq": "bool_q",
}


def _tfds_is_mocked(tfds) -> bool:
  # Inside tfds.testing.mock_data datasets are generated, never prepared.
  prepare = tfds.core.DatasetBuilder.download_and_prepare
  return getattr(prepare, "__name__", "").startswith("mock_")


def load_tfds_task(
  name: str,
  data_dir: str | os.PathLike | None = None,
  split: str | None = None,
  max_examples: int | None = None,
  max_shots: int = 1000,
) -> Task:
  """The TFDS task `name` (a key of TFDS_TASKS or an alias), read from `data_dir`.

  Records with a negative label (hidden test answers) are skipped.
  """
  import importlib

  import tensorflow_datasets as tfds  # local: slow to import, only needed here

  key = ALIASES.get(name, name)
  if key not in TFDS_TASKS:
    raise TaskError(
      f"unknown TFDS task {name!r}; known: {sorted(TFDS_TASKS)} (or give a local JSONL file)"
    )
  spec = TFDS_TASKS[key]
  if spec.module:
    importlib.import_module(spec.module)
  try:
    builder = tfds.builder(spec.tfds_name, data_dir=None if data_dir is None else str(data_dir))
  except tfds.core.registered.DatasetNotFoundError as e:
    raise TaskError(f"TFDS has no dataset {spec.tfds_name!r}: {e}") from None
  mocked = _tfds_is_mocked(tfds)
  if not mocked and not builder.is_prepared():
    raise TaskError(
      f"TFDS dataset {spec.tfds_name!r} (task {key}) is not prepared in {builder.data_dir}. "
      "Evaluation never downloads; prepare it once where the network is reachable: "
      f"`python -c \"import tensorflow_datasets as tfds; tfds.builder('{spec.tfds_name}'"
      f"{', data_dir=...' if data_dir else ''}).download_and_prepare("
      "file_format='array_record')\"`, then pass --tfds_data_dir"
    )

  def read(split_name: str, limit: int | None) -> tuple[Example, ...]:
    if not mocked and split_name not in builder.info.splits:
      raise TaskError(
        f"{spec.tfds_name} has no split {split_name!r} (it has {list(builder.info.splits)})"
      )
    source = builder.as_data_source(split=split_name)
    out = []
    for i in range(len(source)):
      if limit is not None and len(out) >= limit:
        break
      record = source[i]
      label = record.get("label", record.get("answerKey", 0))
      if np.ndim(label) == 0 and int(label) < 0:
        continue
      out.append(spec.convert(record))
    return tuple(out)

  examples = read(split or spec.split, max_examples)
  shots = read(spec.shots_split, max_shots) if spec.shots_split else ()
  return Task(name=key, examples=examples, shots=shots, primary=spec.primary)
