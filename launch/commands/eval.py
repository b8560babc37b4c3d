"""`ablax eval --model_dir DIR TASK [TASK ...]`: evaluate a model directory.

TASK is one of
  heldout        loss, perplexity and bits per byte per source (--source) and domain;
  memorization   Gemma-style exact / approximate memorization of training documents;
  NAME           a multiple-choice task from a prepared TFDS dataset (piqa, arc_easy,
                 arc_challenge, bool_q, openbookqa, hellaswag, winogrande);
  FILE.jsonl     a multiple-choice task in the JSONL schema of core/eval/README.md.

Multiple-choice accuracies carry lm-eval's names and definitions (acc, acc_norm,
acc_mutual_info) and the LLaMA paper's variants (acc_char, acc_unconditional,
acc_token), each with its _stderr; core/eval/mc_metrics.py defines them.
--details FILE writes every choice's log-likelihood as JSONL, to compare with
another harness request by request.

Metrics are printed (or --json) and, with --run_id or --experiment, logged to
MLflow: --run_id RUN adds them to an existing run (e.g. the training run; 'train'
means the run recorded in the model directory), --experiment NAME creates an eval
run. The tracking URI is --tracking_uri, else the store the training run
recorded in its workdir's run.json (next to the model directory), else the default
store ($MLFLOW_TRACKING_URI, else runs/mlflow.db).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from core.errors import UserError
from core.eval.mc_metrics import DEFAULT_METRICS, METRICS
from core.tracking import schema

SPECIAL = ("heldout", "memorization")
DEFAULT_SOURCES = ("code=embedded:code", "prose=embedded:prose")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model_dir", required=True, help="ablax model directory")
  parser.add_argument(
    "tasks",
    nargs="+",
    metavar="TASK",
    help="heldout, memorization, a TFDS task name or a .jsonl file",
  )
  parser.add_argument("--tokenizer", help="SentencePiece .model file (default: the model's)")
  data = parser.add_argument_group("heldout and memorization data")
  data.add_argument(
    "--source",
    action="append",
    metavar="NAME=SPEC",
    help="a text source, e.g. code=embedded:code, wiki=tfds:wiki40b/en, "
    "mine=files:data/*.txt (repeatable; default: the embedded code and prose)",
  )
  data.add_argument(
    "--domain",
    action="append",
    metavar="NAME=DOMAIN",
    help="report source NAME also under DOMAIN (repeatable)",
  )
  data.add_argument("--split", help="heldout: validation (default); memorization: train")
  data.add_argument(
    "--seq_len", type=int, default=None, help="heldout row length (default: min(max_seq_len, 1024))"
  )
  data.add_argument("--batch_size", type=int, default=8, help="rows per forward pass")
  data.add_argument("--num_batches", type=int, default=16, help="heldout batches per source")
  data.add_argument(
    "--num_documents", type=int, default=100, help="memorization: documents per source"
  )
  data.add_argument(
    "--prefix_len",
    type=int,
    default=50,
    help="memorization: prompt tokens taken from each document (Gemma: 50)",
  )
  data.add_argument(
    "--suffix_len",
    type=int,
    default=50,
    help="memorization: tokens that must follow exactly (Gemma: 50)",
  )
  mc = parser.add_argument_group("multiple choice")
  mc.add_argument("--num_shots", type=int, default=0, help="solved examples before each question")
  mc.add_argument("--seed", type=int, default=0, help="which shots each example gets")
  mc.add_argument(
    "--max_examples",
    type=int,
    default=None,
    help="score only the first N examples of each task (default: all)",
  )
  mc.add_argument("--shots_file", help="JSONL tasks: draw shots from this file")
  mc.add_argument(
    "--primary",
    choices=sorted(METRICS),
    help="the accuracy repeated as acc_primary (default: the task's; LLaMA's "
    "choice for TFDS tasks, acc_norm for JSONL)",
  )
  mc.add_argument(
    "--metric",
    action="append",
    choices=sorted(METRICS),
    dest="metrics",
    help="report this accuracy too (repeatable; default: "
    f"{', '.join(DEFAULT_METRICS)}; acc_mutual_info and acc_unconditional "
    "cost a second pass)",
  )
  mc.add_argument(
    "--details",
    metavar="FILE",
    help="write per-choice log-likelihoods as JSONL (task, example, choice, "
    "context, continuation, loglikelihood, is_greedy, num_tokens, ...)",
  )
  mc.add_argument("--tfds_data_dir", help="where the TFDS tasks are prepared")
  track = parser.add_argument_group("MLflow")
  track.add_argument("--run_id", help="log into this run ('train': the model's training run)")
  track.add_argument("--experiment", help="create an eval run in this experiment")
  track.add_argument(
    "--tracking_uri",
    help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)",
  )
  track.add_argument(
    "--step",
    type=int,
    default=None,
    help="step of the logged metrics (default: the model's training step)",
  )
  parser.add_argument("--json", action="store_true", help="print JSON")


class _Usage(UserError, ValueError):
  pass


def _pairs(values, what: str) -> dict[str, str]:
  out = {}
  for v in values or ():
    name, sep, rest = v.partition("=")
    if not sep or not name or not rest:
      raise _Usage(f"--{what} takes NAME=VALUE, got {v!r}")
    out[name] = rest
  return out


def _heldout(args, model, config, tok) -> dict[str, float]:
  from core.data.pipeline import lm_batches
  from core.eval import heldout

  sources = _pairs(args.source or DEFAULT_SOURCES, "source")
  seq_len = args.seq_len or min(config.max_seq_len, 1024)
  batches = {
    name: lm_batches(
      sources={name: spec},
      seq_len=seq_len,
      batch_size=args.batch_size,
      tokenizer=tok,
      split=args.split or "validation",
      num_epochs=1,
    )
    for name, spec in sources.items()
  }
  return heldout.evaluate(
    model,
    batches,
    tokenizer=tok,
    domains=_pairs(args.domain, "domain"),
    max_batches=args.num_batches,
  )


def _memorization(args, model, tok) -> dict[str, float]:
  from core.data.sources import open_sources
  from core.eval import memorization

  sources = open_sources(_pairs(args.source or DEFAULT_SOURCES, "source"), args.split or "train")
  metrics = {}
  for name, source in sources.items():
    texts = (source[i] for i in range(len(source)))
    docs = memorization.documents_from_texts(texts, tok)
    metrics.update(
      memorization.evaluate(
        model,
        docs,
        prefix_len=args.prefix_len,
        suffix_len=args.suffix_len,
        max_documents=args.num_documents,
        prefix=f"{schema.EVAL_MEMORIZATION}/{name}",
      )
    )
  return metrics


def _tracking_uri(args) -> str:
  if args.tracking_uri:
    return args.tracking_uri
  from core.tracking.store import default_tracking_uri  # pylint: disable=g-import-not-at-top
  from core.train.tracking import read_run_file  # pylint: disable=g-import-not-at-top

  recorded = read_run_file(Path(args.model_dir).resolve().parent).get(schema.TRACKING_URI_KEY)
  return recorded or default_tracking_uri()


def _log(args, meta, metrics: dict[str, float], step: int) -> str:
  from core.tracking.run import RunTracker, clean_key

  uri = _tracking_uri(args)
  run_id = args.run_id
  if run_id == "train":
    source = str(meta.get("source") or "")
    if not source.startswith("train:") or len(source) < 7 or "/" in source[6:]:
      raise _Usage(
        f"{args.model_dir} does not record an MLflow training run "
        f"(source {source!r}); pass the run id"
      )
    run_id = source[len("train:") :]
  values = {clean_key(k): float(v) for k, v in metrics.items()}
  if run_id:
    # Add to the run without touching its status: it may still be training.
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    items = [Metric(k, v, now, step) for k, v in values.items()]
    client = MlflowClient(uri)
    for i in range(0, len(items), 500):
      client.log_batch(run_id, metrics=items[i : i + 500])
    return run_id
  tracker = RunTracker(
    uri,
    args.experiment,
    run_name=f"eval {Path(args.model_dir).name}",
    tags={schema.KIND: "eval", schema.MODEL_DIR: str(args.model_dir)},
  )
  with tracker:
    tracker.log_params(
      {
        "model_dir": str(Path(args.model_dir).resolve()),
        "tasks": " ".join(args.tasks),
        "num_shots": args.num_shots,
      }
    )
    tracker.log_metrics(values, step=step)
  return tracker.run_id


def run(args: argparse.Namespace) -> int:
  from core.data.errors import DataError
  from core.eval import suite
  from core.eval.mc_metrics import write_details
  from core.eval.multiple_choice import TaskError, evaluate as mc_evaluate
  from core.model_dir.io import ModelIOError
  from core.model_dir.load import load_model_dir
  from core.tokenizer import TokenizerError

  metrics: dict[str, float] = {}
  details: list[dict] = []
  try:
    if args.details and not Path(args.details).resolve().parent.is_dir():
      raise _Usage(f"--details {args.details}: its folder does not exist")
    model, config, tok, meta = load_model_dir(args.model_dir, args.tokenizer)
    for task in args.tasks:
      if task == "heldout":
        metrics.update(_heldout(args, model, config, tok))
      elif task == "memorization":
        metrics.update(_memorization(args, model, tok))
      else:
        loaded = suite.load_task(
          task, args.tfds_data_dir, args.max_examples, args.shots_file, args.primary
        )
        scored = mc_evaluate(
          model,
          tok,
          loaded,
          num_shots=args.num_shots,
          seed=args.seed,
          max_examples=args.max_examples,
          metrics=list(dict.fromkeys([*DEFAULT_METRICS, *(args.metrics or ())])),
          return_details=bool(args.details),
        )
        details.extend(scored.pop("details", ()))
        metrics.update(scored)
    if args.details:
      write_details(args.details, details)
    step = args.step if args.step is not None else int((meta.get("metadata") or {}).get("step", 0))
    run_id = _log(args, meta, metrics, step) if (args.run_id or args.experiment) else None
  except (_Usage, ModelIOError, TokenizerError, TaskError, DataError) as e:
    print(f"ablax eval: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(
      json.dumps(
        {"model_dir": str(args.model_dir), "step": step, "run_id": run_id, "metrics": metrics},
        indent=2,
        sort_keys=True,
      )
    )
    return 0
  width = max(len(k) for k in metrics) if metrics else 0
  for key in sorted(metrics):
    print(f"{key:<{width}}  {metrics[key]:.6g}")
  if run_id:
    print(f"logged to MLflow run {run_id} at step {step}", file=sys.stderr)
  return 0
