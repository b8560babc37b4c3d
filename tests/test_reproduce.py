"""ablax reproduce: fetch a run's config, re-run it linked to the original, compare the curves.

The flow tests use a stand-in trainer (same flags and run.json contract as
`ablax train`) that copies or perturbs the original's curves; the slow test
reproduces a real tiny training run and expects identical curves.
"""

import json
import subprocess
import sys

import pytest

from analysis import reproduce as repro
from analysis import runs as runs_lib
from launch import cli

CONFIG = """\
from __gin__ import dynamic_registration
from core.model import config
include 'gin/models/tiny_llama.gin'
config.ModelConfig.num_layers = 2
"""

FAKE_TRAIN = r"""
import argparse, json, os
from pathlib import Path
from mlflow.tracking import MlflowClient
from mlflow.entities import Metric
p = argparse.ArgumentParser()
p.add_argument("--gin_file", action="append")
p.add_argument("--workdir")
p.add_argument("--tracking_uri")
a = p.parse_args()
assert Path(a.gin_file[0]).read_text().startswith("from __gin__")
assert os.environ["XLA_FLAGS"] == "--xla_test_flag=1"  # the original worker's settings
if hasattr(os, "sched_getaffinity"):
  assert len(os.sched_getaffinity(0)) == 1
record = json.loads((Path(a.workdir) / "run.json").read_text())
c = MlflowClient(a.tracking_uri)
run_id = record["mlflow_run_id"]
c.update_run(run_id, status="RUNNING")
scale = float(os.environ.get("FAKE_SCALE", "1"))
source = os.environ["FAKE_SOURCE"]
metrics = [Metric(k, m.value * (scale if k == "train/loss" else 1), 0, m.step)
           for k in ("train/loss", "train/tokens_per_s")
           for m in c.get_metric_history(source, k)]
c.log_batch(run_id, metrics=metrics, synchronous=True)
c.log_artifact(run_id, os.environ["FAKE_MANIFEST"], "data")
c.set_terminated(run_id, "FINISHED")
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """One store for the module: creating a fresh sqlite store is the slow part."""
  return f"sqlite:///{tmp_path_factory.mktemp('repro') / 'mlflow.db'}"


@pytest.fixture
def original(tmp_path, store, monkeypatch):
  """A finished run with a config artifact, a data manifest and loss/throughput curves."""
  from mlflow.entities import Metric

  monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
  c = runs_lib.client(store)
  exp = c.create_experiment(f"repro-{tmp_path.name}", artifact_location=(tmp_path / "art").as_uri())
  run = c.create_run(
    exp,
    run_name="orig",
    tags={
      "git.commit": "abc",
      "pkg.jax": "0.0.1",
      "ablax.env.XLA_FLAGS": "--xla_test_flag=1",
      "ablax.cpus": "1",
    },
  )
  run_id = run.info.run_id
  (tmp_path / "config").mkdir()
  (tmp_path / "config" / "operative_config.gin").write_text(CONFIG)
  c.log_artifact(run_id, str(tmp_path / "config" / "operative_config.gin"), "config")
  (tmp_path / "data").mkdir()
  manifest = tmp_path / "data" / "manifest.json"
  manifest.write_text(json.dumps({"fingerprint": "f1", "python": "3.11"}))
  c.log_artifact(run_id, str(manifest), "data")
  c.log_batch(
    run_id,
    metrics=[Metric("train/loss", 5.0 - 0.1 * s, 0, s) for s in range(1, 6)]
    + [Metric("train/tokens_per_s", 1000.0 + s, 0, s) for s in range(1, 6)],
    synchronous=True,
  )
  c.set_terminated(run_id, "FINISHED")
  return c, run_id


def reproduce(tmp_path, monkeypatch, run_id, scale="1", extra=()):
  script = tmp_path / "fake_train.py"
  script.write_text(FAKE_TRAIN)
  manifest = tmp_path / "new" / "manifest.json"
  manifest.parent.mkdir(exist_ok=True)
  manifest.write_text(json.dumps({"fingerprint": "f1", "python": "3.11"}))
  monkeypatch.setenv("FAKE_SOURCE", run_id)
  monkeypatch.setenv("FAKE_SCALE", scale)
  monkeypatch.setenv("FAKE_MANIFEST", str(manifest))
  return cli.main(
    [
      "reproduce",
      run_id,
      "--workdir",
      str(tmp_path / f"w{scale}"),
      "--train_command",
      f"{sys.executable} {script}",
      *extra,
    ]
  )


def test_identical_rerun_is_linked_and_reported(tmp_path, monkeypatch, capsys, original):
  c, run_id = original
  assert reproduce(tmp_path, monkeypatch, run_id) == 0
  out, err = capsys.readouterr()
  assert "IDENTICAL: 1 metric curves, 5 values" in out  # tokens/s is not compared
  assert "code differs now: git.commit: 'abc'" in err
  assert "environment differs now: pkg.jax: '0.0.1'" in err
  reruns = c.search_runs(
    [c.get_run(run_id).info.experiment_id], f"tags.`{runs_lib.REPRODUCES_TAG}` = '{run_id}'"
  )
  assert len(reruns) == 1
  new = reruns[0]
  assert new.info.status == "FINISHED" and new.data.tags["ablax.reproduce.result"] == "identical"
  assert {f.path for f in c.list_artifacts(new.info.run_id, "reproduce")} == {
    "reproduce/report.json"
  }


def test_different_curves_give_max_relative_difference(tmp_path, monkeypatch, capsys, original):
  _, run_id = original
  assert reproduce(tmp_path, monkeypatch, run_id, scale="1.001") == 1
  out = capsys.readouterr().out
  assert "DIFFERENT (rtol 0): max relative difference 9.990e-04 in train/loss at step" in out
  assert reproduce(tmp_path, monkeypatch, run_id, scale="1.0001", extra=["--rtol", "1e-3"]) == 0
  assert "MATCH within rtol" in capsys.readouterr().out


def test_missing_run_or_config_fails_before_training(tmp_path, capsys, store, monkeypatch):
  monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
  marker = tmp_path / "trained"
  argv = ["--workdir", str(tmp_path / "w"), "--train_command", f"touch {marker}"]
  assert cli.main(["reproduce", "0" * 32, *argv]) == 2
  assert "run '00000000000000000000000000000000' not found" in capsys.readouterr().err
  c = runs_lib.client(store)
  exp = c.create_experiment("bare", artifact_location=(tmp_path / "art").as_uri())
  bare = c.create_run(exp).info.run_id
  assert cli.main(["reproduce", bare, *argv]) == 2
  assert "has no operative config artifact" in capsys.readouterr().err
  assert not marker.exists()


def test_history_comparison_units():
  assert repro.rel_diff(2.0, 2.0) == 0.0 and repro.rel_diff(1.0, 1.1) == pytest.approx(0.1 / 1.1)
  assert repro.dict_differences({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "d": 3}) == [
    "a.b: 1 -> 2",
    "c only in the original",
    "d only in the re-run",
  ]
  diffs = repro.tag_differences(
    {"git.commit": "a", "python": "3.11", "mlflow.user": "x"},
    {"git.commit": "b", "python": "3.12", "mlflow.user": "y"},
  )
  assert diffs == {"code": [("git.commit", "a", "b")], "environment": [("python", "3.11", "3.12")]}


@pytest.mark.slow
def test_real_tiny_run_reproduces_identically(tmp_path, _mlflow_store):
  train = [
    sys.executable,
    "-m",
    "launch.cli",
    "train",
    "--gin_file",
    "gin/experiments/tiny_llama.gin",
    "--workdir",
    str(tmp_path / "orig"),
    "--tracking_uri",
    _mlflow_store,
  ]
  for p in (
    "num_steps = 4",
    "log_every = 1",
    "eval_every = 0",
    "eval_batches = 1",
    "checkpoint_every = 0",
    "export_model = False",
  ):
    train += ["--gin_param", f"core.train.loop.train.{p}"]
  subprocess.run(train, check=True, capture_output=True, cwd=cli.__file__.rsplit("/launch", 1)[0])
  run_id = json.loads((tmp_path / "orig" / "run.json").read_text())["mlflow_run_id"]
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.cli",
      "reproduce",
      run_id,
      "--workdir",
      str(tmp_path / "again"),
      "--tracking_uri",
      _mlflow_store,
    ],
    capture_output=True,
    text=True,
    cwd=cli.__file__.rsplit("/launch", 1)[0],
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "IDENTICAL" in out.stdout and "train/loss" in out.stdout
