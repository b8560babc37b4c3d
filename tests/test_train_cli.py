"""`ablax train` end to end on a tiny experiment: the run directory and the MLflow run."""

import json
import os

from mlflow.tracking import MlflowClient

from launch import cli


def test_ablax_train_writes_run_directory_and_mlflow_run(tmp_path, _mlflow_store, capsys):
  os.environ["ABLAX_CPU_PEAK_FLOPS"] = "1e11"  # MFU is not under test; skip the measurement
  try:
    workdir = tmp_path / "run"
    rc = cli.main(["train", "--gin_file", "gin/experiments/tiny_llama.gin",
                   "--gin_param", "core.train.loop.train.num_steps = 4",
                   "--gin_param", "core.train.loop.train.log_every = 2",
                   "--gin_param", "core.train.loop.train.checkpoint_every = 2",
                   "--gin_param", "core.train.loop.train.eval_batches = 1",
                   "--gin_param", "core.train.mesh.MeshConfig.fsdp = 4",
                   "--gin_param", "core.train.mesh.MeshConfig.tensor = 2",
                   "--workdir", str(workdir)])
  finally:
    del os.environ["ABLAX_CPU_PEAK_FLOPS"]
  assert rc == 0
  out = capsys.readouterr().out
  assert "step 4/4 | loss" in out and "tok/s | MFU" in out and "ETA" in out
  for name in ("config.gin", "operative_config.gin", "metrics.jsonl", "run.json"):
    assert (workdir / name).is_file(), name
  assert "num_steps = 4" in (workdir / "operative_config.gin").read_text()
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == \
      ["2", "4"]
  assert (workdir / "model" / "ablax_model.json").is_file()
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [2, 4]
  assert {"tokens_per_s", "mfu", "eta_s", "grad_norm"} <= set(records[0])
  assert any("eval_loss" in r for r in records)

  run_id = json.loads((workdir / "run.json").read_text())["mlflow_run_id"]
  run = MlflowClient(_mlflow_store).get_run(run_id)
  assert run.info.status == "FINISHED"
  assert run.data.params["model.embed_dim"] == "128"
  # 'auto' as resolved for 128 tokens on CPU: the einsum reference (attention_impls.choose).
  assert run.data.params["model.attention_impl"] == "auto"
  assert run.data.params["attention.impl.global"] == "einsum"
  assert any(k.startswith("gin.") for k in run.data.params)
  assert "train/loss" in run.data.metrics and "eval/loss" in run.data.metrics
  assert run.data.tags.get("git.commit") and run.data.tags.get("mesh")
  artifacts = {a.path for a in MlflowClient(_mlflow_store).list_artifacts(run_id)}
  assert "config" in artifacts and "metrics.jsonl" in artifacts
