"""`ablax eval` and `ablax sample` on a tiny saved model, logging to MLflow."""

import json

import mlflow
import pytest
from flax import nnx

from core.eval.suite import EvalSuite
from core.model.transformer import Transformer
from core.model_dir import io
from core.tokenizer import train_tokenizer
from launch import cli
from tests.tiny_model import tiny_config

PROSE = (
  "Paris is the capital of France. Berlin is the capital of Germany. "
  "Water boils at one hundred degrees. The sun rises in the east and sets in the west. "
)
CODE = "def add(a, b):\n\treturn a + b\n\nprint(add(2, 3))\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("model")
  tok = train_tokenizer([PROSE * 3, CODE * 3], root / "tok.model", vocab_size=300)
  config = tiny_config(
    vocab_size=tok.vocab_size,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    mlp_dim=64,
    max_seq_len=128,
    norm_placement="pre_post",
    attention_pattern=("local", "global"),
    window=8,
  )
  model = Transformer(config, rngs=nnx.Rngs(0))
  out = io.save_model(
    root / "model",
    model,
    config,
    tokenizer_path=root / "tok.model",
    metadata={"source": "test", "step": 7},
  )
  data = root / "data"
  data.mkdir()
  (data / "prose.txt").write_text(PROSE * 4)
  (data / "code.txt").write_text(CODE * 8)
  task = root / "task.jsonl"
  task.write_text(
    "\n".join(
      json.dumps(r)
      for r in [
        {"context": "Paris is the capital of", "choices": ["France", "Germany"], "label": 0},
        {"context": "The sun rises in the", "choices": ["east", "west"], "label": 0},
        {"context": "Water boils at one hundred", "choices": ["degrees", "cats", "x"], "label": 0},
      ]
    )
    + "\n"
  )
  return {"dir": str(out), "data": data, "task": str(task), "tokenizer": tok}


def run_cli(argv, capsys):
  code = cli.main(argv)
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_eval_heldout_memorization_and_jsonl_logged_to_a_new_run(
  model_dir, capsys, tmp_path, monkeypatch
):
  monkeypatch.setenv("ABLAX_CACHE", str(tmp_path / "cache"))
  data = model_dir["data"]
  argv = [
    "eval",
    "--model_dir",
    model_dir["dir"],
    "heldout",
    "memorization",
    model_dir["task"],
    "--source",
    f"prose=files:{data}/prose.txt",
    "--source",
    f"code=files:{data}/code.txt",
    "--domain",
    "prose=text",
    "--split",
    "train",
    "--seq_len",
    "32",
    "--batch_size",
    "2",
    "--num_batches",
    "2",
    "--num_documents",
    "2",
    "--prefix_len",
    "10",
    "--suffix_len",
    "10",
    "--num_shots",
    "1",
    "--experiment",
    "evals",
    "--json",
  ]
  code, out, err = run_cli(argv, capsys)
  assert code == 0, err
  result = json.loads(out)
  metrics = result["metrics"]
  assert result["step"] == 7
  for key in (
    "eval/heldout/prose/bits_per_byte",
    "eval/heldout/code/loss",
    "eval/heldout/domain/text/loss",
    "eval/memorization/prose/exact_rate",
    "eval/memorization/code/approximate_rate",
    "eval/mc/task/1shot/acc",
    "eval/mc/task/1shot/acc_norm",
    "eval/mc/task/1shot/acc_char",
    "eval/mc/task/1shot/acc_token",
    "eval/mc/task/1shot/acc_primary",
    "eval/mc/task/1shot/acc_stderr",
    "eval/mc/task/1shot/acc_norm_stderr",
  ):
    assert key in metrics, key
  assert metrics["eval/mc/task/1shot/acc_primary"] == metrics["eval/mc/task/1shot/acc_norm"]
  run = mlflow.tracking.MlflowClient().get_run(result["run_id"])
  for key in ("eval/mc/task/1shot/acc", "eval/mc/task/1shot/acc_norm_stderr"):
    assert run.data.metrics[key] == pytest.approx(metrics[key])
  assert run.data.tags["ablax.kind"] == "eval"


def test_eval_logs_into_an_existing_run_without_ending_it(model_dir, capsys):
  client = mlflow.tracking.MlflowClient()
  exp = client.create_experiment("train")
  run = client.create_run(exp)
  code, out, err = run_cli(
    [
      "eval",
      "--model_dir",
      model_dir["dir"],
      model_dir["task"],
      "--run_id",
      run.info.run_id,
      "--step",
      "42",
      "--primary",
      "acc_unconditional",
    ],
    capsys,
  )
  assert code == 0, err
  assert "eval/mc/task/0shot/acc_unconditional" in out
  after = client.get_run(run.info.run_id)
  assert after.info.status == "RUNNING"
  assert (
    after.data.metrics["eval/mc/task/0shot/acc_primary"]
    == after.data.metrics["eval/mc/task/0shot/acc_unconditional"]
  )
  history = client.get_metric_history(run.info.run_id, "eval/mc/task/0shot/acc_primary")
  assert [m.step for m in history] == [42]


DETAIL_FIELDS = {
  "task",
  "num_shots",
  "example",
  "choice",
  "label",
  "context",
  "continuation",
  "choice_text",
  "loglikelihood",
  "is_greedy",
  "num_tokens",
  "num_chars",
  "loglikelihood_bos",
  "loglikelihood_answer_prompt",
}


def test_eval_details_reproduce_the_reported_accuracies(model_dir, capsys, tmp_path):
  from core.eval import mc_metrics

  details = tmp_path / "details.jsonl"
  code, out, err = run_cli(
    [
      "eval",
      "--model_dir",
      model_dir["dir"],
      model_dir["task"],
      "--metric",
      "acc_mutual_info",
      "--metric",
      "acc_unconditional",
      "--details",
      str(details),
      "--json",
    ],
    capsys,
  )
  assert code == 0, err
  metrics = json.loads(out)["metrics"]
  rows = mc_metrics.read_details(details)
  assert len(rows) == 2 + 2 + 3  # one row per choice of the task file's three questions
  for row in rows:
    assert set(row) == DETAIL_FIELDS
    assert isinstance(row["loglikelihood"], float) and isinstance(row["is_greedy"], bool)
    assert row["num_chars"] == len(row["continuation"]) and row["num_tokens"] >= 1
  assert [(r["example"], r["choice"]) for r in rows] == [
    (0, 0),
    (0, 1),
    (1, 0),
    (1, 1),
    (2, 0),
    (2, 1),
    (2, 2),
  ]
  assert rows[2]["context"] == "The sun rises in the" and rows[3]["continuation"] == " west"
  assert rows[3]["choice_text"] == "west" and rows[4]["label"] == 0
  # From the file alone, by each metric's definition, the reported numbers come back.
  labels = [0, 0, 0]
  for metric in mc_metrics.METRICS:
    score = {
      "acc": lambda r: r["loglikelihood"],
      "acc_norm": lambda r: r["loglikelihood"] / len(r["choice_text"]),
      "acc_char": lambda r: r["loglikelihood"] / len(r["continuation"]),
      "acc_token": lambda r: r["loglikelihood"] / r["num_tokens"],
      "acc_mutual_info": lambda r: r["loglikelihood"] - r["loglikelihood_bos"],
      "acc_unconditional": lambda r: r["loglikelihood"] - r["loglikelihood_answer_prompt"],
    }[metric]
    right = []
    for i, label in enumerate(labels):
      choices = [r for r in rows if r["example"] == i]
      right.append(max(range(len(choices)), key=lambda j: (score(choices[j]), -j)) == label)
    assert metrics[f"eval/mc/task/0shot/{metric}"] == pytest.approx(sum(right) / 3), metric
  code, _, err = run_cli(
    [
      "eval",
      "--model_dir",
      model_dir["dir"],
      model_dir["task"],
      "--details",
      str(tmp_path / "no" / "such.jsonl"),
    ],
    capsys,
  )
  assert code == 2 and "folder does not exist" in err


def test_eval_errors_are_clear(model_dir, capsys, tmp_path):
  code, _, err = run_cli(["eval", "--model_dir", model_dir["dir"], "no_such_task"], capsys)
  assert code == 2 and "unknown TFDS task 'no_such_task'" in err
  code, _, err = run_cli(
    ["eval", "--model_dir", model_dir["dir"], "piqa", "--tfds_data_dir", str(tmp_path)], capsys
  )
  assert code == 2 and "not prepared" in err and "never downloads" in err
  code, _, err = run_cli(["eval", "--model_dir", str(tmp_path), "piqa"], capsys)
  assert code == 2 and "not an ablax model directory" in err
  code, _, err = run_cli(
    ["eval", "--model_dir", model_dir["dir"], model_dir["task"], "--run_id", "train"], capsys
  )
  assert code == 2 and "does not record an MLflow training run" in err


def test_sample(model_dir, capsys):
  base = [
    "sample",
    "--model_dir",
    model_dir["dir"],
    "--prompt",
    "Paris is",
    "--prompt",
    "def add(",
    "--max_new_tokens",
    "6",
    "--ignore_eos",
    "--json",
  ]
  code, out, err = run_cli(base, capsys)
  assert code == 0, err
  greedy = json.loads(out)
  assert [len(s["ids"]) for s in greedy["samples"]] == [6, 6]
  tok = model_dir["tokenizer"]
  assert greedy["samples"][0]["completion"] == tok.decode(greedy["samples"][0]["ids"])
  code, _, err = run_cli(base + ["--temperature", "-1"], capsys)
  assert code == 2 and "temperature" in err


def test_sample_warns_past_max_seq_len(model_dir, capsys):
  # RoPE runs past max_seq_len (128): one warning line naming the lengths, then the samples.
  base = [
    "sample",
    "--model_dir",
    model_dir["dir"],
    "--prompt",
    "Paris is",
    "--ignore_eos",
    "--json",
    "--max_new_tokens",
  ]
  code, out, err = run_cli(base + ["130"], capsys)
  assert code == 0, err
  warnings = [l for l in err.splitlines() if "warning" in l]
  assert len(warnings) == 1 and "runs past max_seq_len 128" in warnings[0], err
  assert len(json.loads(out)["samples"][0]["ids"]) == 130
  code, _, err = run_cli(base + ["6"], capsys)
  assert code == 0 and "warning" not in err


def test_eval_suite_is_a_plain_callable_for_the_training_loop(model_dir, tmp_path):
  model, _, _ = io.load_model(model_dir["dir"])
  tok = model_dir["tokenizer"]
  from core.data.packing import pack_documents

  rows = pack_documents([[tok.bos_id] + tok.encode(PROSE) + [tok.eos_id]], seq_len=32)
  docs = [[tok.bos_id] + tok.encode(PROSE * 2)]
  suite = EvalSuite(
    tokenizer=tok,
    heldout_batches={"prose": lambda: [rows]},
    tasks=[model_dir["task"]],
    max_examples=2,
    memorization_documents=lambda: iter(docs),
    memorization_max_documents=1,
  )
  first = suite(model, step=10)
  assert first["eval/mc/task/0shot/num_examples"] == 2
  assert "eval/heldout/prose/bits_per_byte" in first and "eval/memorization/exact_rate" in first
  assert suite(model, step=20) == first  # same data every time


GIN_EVALS = """
from __gin__ import dynamic_registration
import core.data.pipeline
import core.eval.suite

core.eval.suite.EvalSuite:
  tokenizer = %TOKENIZER
  heldout_batches = {'prose': @heldout_prose/core.data.pipeline.lm_batches}
  heldout_max_batches = 2
  tasks = [%TASK]
  num_shots = 1

heldout_prose/core.data.pipeline.lm_batches:
  sources = {'prose': %PROSE}
  tokenizer = %TOKENIZER
  seq_len = 32
  batch_size = 2
  split = 'train'
  num_epochs = 1
"""


def test_eval_suite_from_gin_as_in_the_readme(model_dir, tmp_path, monkeypatch):
  import gin

  monkeypatch.setenv("ABLAX_CACHE", str(tmp_path / "cache"))
  tok = model_dir["tokenizer"]
  gin.parse_config(
    [
      f"TOKENIZER = '{tok.path}'",
      f"TASK = '{model_dir['task']}'",
      f"PROSE = 'files:{model_dir['data']}/prose.txt'",
      GIN_EVALS,
    ]
  )
  suite = gin.get_configurable(EvalSuite)()
  model, _, _ = io.load_model(model_dir["dir"])
  metrics = suite(model, step=1)
  assert "eval/heldout/prose/bits_per_byte" in metrics and "eval/mc/task/1shot/acc" in metrics


def test_training_logs_the_suites_accuracies_under_the_same_names(
  model_dir, tmp_path, _mlflow_store
):
  import functools

  import jax

  from core.tracking import schema
  from core.train import optimizer, synthetic
  from core.train.loop import train
  from core.train.mesh import MeshConfig

  tok = model_dir["tokenizer"]
  config = tiny_config(
    vocab_size=tok.vocab_size, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64
  )
  suite = EvalSuite(tokenizer=tok, tasks=[model_dir["task"]], metrics=["acc", "acc_norm"])
  result = train(
    model=config,
    optimizer=functools.partial(optimizer.llama_adamw, peak_lr=1e-3, warmup_steps=1),
    data=functools.partial(synthetic.synthetic_batches, vocab_size=tok.vocab_size, seq_len=32),
    num_steps=2,
    batch_size=2,
    workdir=tmp_path / "run",
    mesh=MeshConfig(1, 1, 1),
    devices=jax.devices()[:1],
    log_every=1,
    eval_batches=0,
    checkpoint_every=0,
    export_model=False,
    progress=False,
    evals=suite,
  )
  run = mlflow.tracking.MlflowClient(_mlflow_store).get_run(result.run_id)
  logged = {k for k in run.data.metrics if k.startswith("eval/mc/")}
  assert logged == {
    f"eval/mc/task/0shot/{m}"
    for m in (
      "acc",
      "acc_stderr",
      "acc_norm",
      "acc_norm_stderr",
      "acc_primary",
      "acc_primary_stderr",
      "num_examples",
    )
  }
  assert all(schema.is_declared_metric(k) for k in logged)
  lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [
    l["eval/mc/task/0shot/acc_norm"] for l in lines if "eval/mc/task/0shot/acc_norm" in l
  ] == [run.data.metrics["eval/mc/task/0shot/acc_norm"]]
