"""Run record helpers: code version, environment, config hash, param flattening."""

import subprocess

import pytest

from core.tracking import record


def _git(repo, *args):
  subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_code_version_clean_then_dirty(tmp_path):
  _git(tmp_path, "init", "-q")
  _git(tmp_path, "config", "user.email", "dev@example.com")
  _git(tmp_path, "config", "user.name", "dev")
  (tmp_path / "a.py").write_text("x = 1\n")
  _git(tmp_path, "add", "a.py")
  _git(tmp_path, "commit", "-q", "-m", "first")
  clean = record.code_version(tmp_path)
  assert len(clean["commit"]) == 40 and clean["dirty"] is False and clean["diff"] == ""
  (tmp_path / "a.py").write_text("x = 2\n")
  (tmp_path / "new.py").write_text("")
  dirty = record.code_version(tmp_path)
  assert dirty["commit"] == clean["commit"] and dirty["dirty"] is True
  assert "-x = 1" in dirty["diff"] and "+x = 2" in dirty["diff"]
  assert dirty["untracked"] == ["new.py"]


def test_code_version_outside_a_checkout(tmp_path):
  v = record.code_version(tmp_path)
  assert v["commit"] is None and v["dirty"] is None and "no git version" in v["error"]


def test_environment():
  env = record.environment({"data": 2, "fsdp": 4, "tensor": 1})
  assert env["device_count"] == 8 and env["device_kind"] == "cpu"  # conftest's fake devices
  assert env["process_count"] == 1 and env["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert env["packages"]["jax"] and env["packages"]["mlflow"]
  assert set(record.PACKAGES) == set(env["packages"])
  assert env["python"].count(".") == 2


def test_config_hash_ignores_comments_and_layout():
  a = "# Parameters for ModelConfig:\nModelConfig.embed_dim = 64\n\nModelConfig.num_layers = 2\n"
  b = "ModelConfig.embed_dim = 64   \nModelConfig.num_layers = 2"
  c = "ModelConfig.embed_dim = 128\nModelConfig.num_layers = 2"
  assert record.config_hash(a) == record.config_hash(b) != record.config_hash(c)
  assert len(record.config_hash(a)) == 64


def test_flatten_params():
  flat = record.flatten_params(
    {"model": {"dim": 64, "pattern": ("local", "global")}, "lr": 3e-4, "name": "x", "empty": {}}
  )
  assert flat == {
    "model.dim": "64",
    "model.pattern": "('local', 'global')",
    "lr": "0.0003",
    "name": "x",
    "empty": "{}",
  }


def test_short_axis_names():
  axes = {
    "ModelConfig.num_kv_heads": 8,
    "train/ModelConfig.window": 4096,
    "Teacher.window": 512,
    "OptConfig.lr": 1e-3,
  }
  assert record.short_axis_names(axes) == {
    "num_kv_heads": "8",
    "ModelConfig.window": "4096",
    "Teacher.window": "512",
    "lr": "0.001",
  }


def test_run_tags():
  code = {"commit": "a" * 40, "dirty": True}
  env = record.environment({"data": 8})
  tags = record.run_tags(code, env, "f" * 64, ablax_version="0.1.0")
  assert tags["git.dirty"] == "true" and tags["mlflow.source.git.commit"] == "a" * 40
  assert tags["ablax.config_hash"] == "f" * 64 and tags["mesh"] == "data=8"
  assert tags["device.count"] == "8" and tags["pkg.jax"] == env["packages"]["jax"]


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_config_hash_of_empty_configs_is_stable(text):
  assert record.config_hash(text) == record.config_hash("")


def test_write_run_record(_mlflow_store, tmp_path):
  from mlflow.tracking import MlflowClient

  from core.tracking.run import RunTracker

  gin_file = tmp_path / "tiny.gin"
  gin_file.write_text("ModelConfig.embed_dim = 64\n")
  operative = (
    "# Parameters for ModelConfig:\nModelConfig.embed_dim = 64\nModelConfig.num_kv_heads = 1\n"
  )
  repo = tmp_path / "repo"
  repo.mkdir()
  _git(repo, "init", "-q")
  (repo / "untracked.py").write_text("")
  with RunTracker(_mlflow_store, "record", workdir=tmp_path / "run") as t:
    tags = record.write_run_record(
      t,
      repo_dir=repo,
      operative_config=operative,
      bound_config="ModelConfig.embed_dim = 64\n",
      gin_files=[gin_file],
      flat_params={"ModelConfig.embed_dim": "64"},
      swept_axes={"ModelConfig.num_kv_heads": 1},
      mesh_shape={"data": 8},
      param_counts={"embedding": 10, "non_embedding": 20, "total": 30},
      dataset_manifest={"files": 3},
    )
  client = MlflowClient(_mlflow_store)
  run = client.get_run(t.run_id)
  assert run.data.params == {"ModelConfig.embed_dim": "64", "num_kv_heads": "1"}
  assert (
    run.data.tags["ablax.config_hash"] == record.config_hash(operative) == tags["ablax.config_hash"]
  )
  assert run.data.tags["ablax.swept"] == "num_kv_heads" and run.data.tags["mesh"] == "data=8"
  listed = {a.path for a in client.list_artifacts(t.run_id, "config")}
  assert listed == {"config/config.gin", "config/operative_config.gin", "config/gin_files"}
  top = {a.path for a in client.list_artifacts(t.run_id)}
  assert {"environment.json", "code", "model", "data"} <= top
