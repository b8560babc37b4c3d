"""`ablax train` end to end on a tiny experiment: the run directory and the MLflow run."""

import json
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from launch import cli


def test_ablax_train_writes_run_directory_and_mlflow_run(
  tmp_path, _mlflow_store, capsys, monkeypatch
):
  monkeypatch.setenv("ABLAX_CPU_PEAK_FLOPS", "1e11")  # MFU is not under test; skip the measurement
  workdir = tmp_path / "run"
  rc = cli.main(
    [
      "train",
      "--gin_file",
      "gin/experiments/tiny_llama.gin",
      "--gin_param",
      "core.train.loop.train.num_steps = 4",
      "--gin_param",
      "core.train.loop.train.log_every = 2",
      "--gin_param",
      "core.train.loop.train.checkpoint_every = 2",
      "--gin_param",
      "core.train.loop.train.eval_batches = 1",
      "--gin_param",
      "core.train.mesh.MeshConfig.fsdp = 4",
      "--gin_param",
      "core.train.mesh.MeshConfig.tensor = 2",
      "--workdir",
      str(workdir),
    ]
  )
  assert rc == 0
  out = capsys.readouterr().out
  assert "step 4/4 | loss" in out and "tok/s | MFU" in out and "ETA" in out
  for name in ("config.gin", "operative_config.gin", "metrics.jsonl", "run.json"):
    assert (workdir / name).is_file(), name
  assert "num_steps = 4" in (workdir / "operative_config.gin").read_text()
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
    "2",
    "4",
  ]
  assert (workdir / "model" / "ablax_model.json").is_file()
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "train/loss" in r] == [2, 4]
  first = next(r for r in records if "train/loss" in r)
  assert {"train/tokens_per_s", "train/mfu", "eta_s", "train/grad_norm"} <= set(first)
  assert any("eval/loss" in r for r in records)

  run_id = json.loads((workdir / "run.json").read_text())["mlflow_run_id"]
  run = MlflowClient(_mlflow_store).get_run(run_id)
  assert run.info.status == "FINISHED"
  assert run.data.params["model.embed_dim"] == "128"
  # 'auto' as resolved for 128 tokens on CPU: the einsum reference (attention_impls.choose).
  assert run.data.params["model.attention_impl"] == "auto"
  assert run.data.params["attention.impl.global"] == "einsum"
  # Keys are module paths from gin's bindings; strings lose gin's quotes; ModelConfig's
  # fields appear once, as model.*.
  assert run.data.params["core.train.optimizer.llama_adamw.peak_lr"] == "0.003"
  assert run.data.params["core.train.loop.train.experiment"] == "tiny_llama"
  assert not any(k.startswith("core.model.config.ModelConfig.") for k in run.data.params)
  assert "train/loss" in run.data.metrics and "eval/loss" in run.data.metrics
  # Curves against tokens and compute, the schedule, and no ETA in the store.
  metrics = run.data.metrics
  assert metrics["train/tokens"] == 4 * 8 * 128
  assert metrics["train/flops"] == 4 * 8 * 128 * float(run.data.params["flops_per_token"])
  # The eval set's own standard error is recorded beside the loss.
  assert 0 < metrics["eval/loss_se"] < 0.1 * metrics["eval/loss"]
  assert 0.9 * 8 * 128 < metrics["eval/tokens"] <= 8 * 128  # padding is not counted
  # 4 steps clamp the warmup to 3, so update 4 runs at the peak (float32).
  assert metrics["train/learning_rate"] == pytest.approx(3e-3) and "train/eta_s" not in metrics
  assert run.data.tags.get("git.commit") and run.data.tags.get("mesh")
  # MLflow's own context tags, for the UI's user and source columns.
  assert run.data.tags.get("mlflow.user") and run.data.tags.get("mlflow.source.type")
  # The data as MLflow dataset inputs, digests from the manifest's fingerprints.
  inputs = run.inputs.dataset_inputs
  assert sorted(d.dataset.name for d in inputs) == ["code", "prose"]
  assert all(len(d.dataset.digest) == 32 for d in inputs)
  assert len({d.dataset.digest for d in inputs}) == 2  # code and prose are different data
  found = MlflowClient(_mlflow_store).search_runs(
    [run.info.experiment_id], f"datasets.digest = '{inputs[0].dataset.digest}'"
  )
  assert [r.info.run_id for r in found] == [run_id]
  # One schema: every key the trainer wrote is one core.tracking.schema declares.
  from core.tracking import schema  # pylint: disable=g-import-not-at-top

  assert [k for k in run.data.metrics if not schema.is_declared_metric(k)] == []
  assert [k for k in run.data.params if not schema.is_declared_param(k)] == []
  assert [k for k in run.data.tags if not schema.is_declared_tag(k)] == []
  assert run.data.tags[schema.CONFIG_HASH]
  artifacts = {a.path for a in MlflowClient(_mlflow_store).list_artifacts(run_id)}
  assert "config" in artifacts and "metrics.jsonl" in artifacts


def _record(tmp_path, name, *extra):
  """(params, config hash) of a 1-step `ablax train` run of tiny_llama (MFU measurement off)."""
  import gin  # pylint: disable=g-import-not-at-top

  gin.clear_config(clear_constants=True)  # each command starts from a fresh gin, as a process does
  workdir = tmp_path / name
  rc = cli.main(
    [
      "train",
      "--gin_file",
      "gin/experiments/tiny_llama.gin",
      *extra,
      "--gin_param",
      "core.train.loop.train.num_steps = 1",
      "--gin_param",
      "core.train.loop.train.eval_batches = 0",
      "--gin_param",
      "core.train.loop.train.export_model = False",
      "--workdir",
      str(workdir),
    ]
  )
  assert rc == 0
  run_id = json.loads((workdir / "run.json").read_text())["mlflow_run_id"]
  run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id)
  params = {k: v for k, v in run.data.params.items() if k != "core.train.loop.train.workdir"}
  return params, run.data.tags["ablax.config_hash"]


def test_param_keys_and_config_hash_are_stable(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("ABLAX_CPU_PEAK_FLOPS", "1e11")  # MFU is not under test
  # A gin file that only imports modules renumbers gin's printed module aliases; the
  # record must not see it.
  imports_only = tmp_path / "imports.gin"
  imports_only.write_text(
    "from __gin__ import dynamic_registration\nimport core.eval.suite\nimport core.train.distill\n"
  )
  base_params, base_hash = _record(tmp_path, "a")
  more_params, more_hash = _record(tmp_path, "b", "--gin_file", str(imports_only))
  assert more_params == base_params and more_hash == base_hash
  # Any changed value changes the hash, a model field included.
  _, lr_hash = _record(
    tmp_path, "c", "--gin_param", "core.train.optimizer.llama_adamw.peak_lr = 0.002"
  )
  _, width_hash = _record(
    tmp_path, "d", "--gin_param", "core.model.config.ModelConfig.num_kv_heads = 2"
  )
  assert len({base_hash, lr_hash, width_hash}) == 3


def test_readme_train_then_compare_finds_the_run_in_the_one_default_store(tmp_path):
  """No MLFLOW_TRACKING_URI: train and compare meet in ./runs/mlflow.db, nothing in ./mlruns."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
  env.update(ABLAX_CPU_PEAK_FLOPS="1e11", PYTHONPATH=str(Path(cli.__file__).parents[1]))
  train = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.cli",
      "train",
      "--gin_file",
      "gin/experiments/tiny_llama.gin",
      "--gin_param",
      "core.train.loop.train.num_steps = 2",
      "--gin_param",
      "core.train.loop.train.eval_batches = 1",
      "--gin_param",
      "core.train.loop.train.export_model = False",
    ],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert train.returncode == 0, train.stderr[-2000:]
  store = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
  run_id = json.loads((tmp_path / "runs" / "tiny_llama" / "run.json").read_text())["mlflow_run_id"]
  # It says where the run went and how to look at it.
  assert f"MLflow run {run_id} in {store}" in train.stdout
  assert f"mlflow ui --backend-store-uri {store}" in train.stdout
  assert not (tmp_path / "mlruns").exists()
  client = MlflowClient(store)
  experiment = client.get_experiment_by_name("tiny_llama")
  assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
  assert experiment.artifact_location.startswith((tmp_path / "runs" / "mlartifacts").as_uri())
  compare = subprocess.run(
    [sys.executable, "-m", "launch.cli", "compare", "--experiment", "tiny_llama"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert compare.returncode == 0, compare.stderr[-2000:]
  assert "tiny_llama" in compare.stdout
