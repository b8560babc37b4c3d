"""Sweeps: expansion of axes x seeds, validation before training, dry run, worker budget, resume.

The runner tests use a fake `ablax train` (a small script honouring the child
contract of launch/sweep_runner.py) so that resume logic is tested in seconds;
tests/test_sweep_e2e.py runs the real trainer.
"""

import json
import sys
import textwrap

import pytest

from core.paths import REPO_ROOT
from launch import cli
from launch import sweep as sweep_lib
from launch import sweep_runner

# A base that parses without the trainer: a tiny model plus a function with a
# `seed` argument to receive the seed binding.
BASE = """\
from __gin__ import dynamic_registration
import core.tokenizer.train
include 'gin/models/tiny_llama.gin'
core.tokenizer.train.sample_lines.max_sentences = 10
"""
SEED_BINDING = "sample_lines.seed"


def sweep_file(tmp_path, axes, seeds="[0, 1]", extra="", name="t"):
  base = tmp_path / "base.gin"
  base.write_text(BASE)
  path = tmp_path / f"{name}.gin"
  path.write_text(
    textwrap.dedent(f"""\
      from __gin__ import dynamic_registration
      import launch.sweep

      launch.sweep.Sweep:
        name = '{name}'
        base = ['{base}']
        params = ['core.model.config.ModelConfig.num_layers = 2']
        axes = {axes}
        seeds = {seeds}
        seed_binding = '{SEED_BINDING}'
      """)
    + extra
  )
  return path


ATTENTION = (
  "{'attention': {'mha': ['core.model.config.ModelConfig.num_kv_heads = 4'], "
  "'gqa': ['core.model.config.ModelConfig.num_kv_heads = 2'], 'mqa': ['core.model.config.ModelConfig.num_kv_heads = 1']}}"
)


def test_expansion_is_axes_product_times_seeds(tmp_path):
  overlay = tmp_path / "post.gin"
  overlay.write_text("core.model.config.ModelConfig.norm_placement = 'post'\n")
  axes = (
    f"{{'attention': {{'mha': ['core.model.config.ModelConfig.num_kv_heads = 4'], 'mqa': "
    f"['core.model.config.ModelConfig.num_kv_heads = 1']}}, 'norm': {{'pre': [], 'post': ['{overlay}']}}, "
    f"'width': {{'binding': 'core.model.config.ModelConfig.embed_dim', 'values': [64, 128]}}}}"
  )
  sweep = sweep_lib.load(str(sweep_file(tmp_path, axes, seeds="[3, 5]")))
  points = sweep_lib.expand(sweep)
  assert len(points) == 2 * 2 * 2 * 2
  # First axis slowest, seeds fastest.
  assert [p.variant for p in points[:3]] == ["attention=mha,norm=pre,width=64"] * 2 + [
    "attention=mha,norm=pre,width=128"
  ]
  assert [p.seed for p in points[:4]] == [3, 5, 3, 5]
  assert len({p.key for p in points}) == len(points)
  p = next(p for p in points if p.variant == "attention=mqa,norm=post,width=128" and p.seed == 5)
  assert p.params == {"attention": "mqa", "norm": "post", "width": "128", "seed": "5"}
  assert p.gin_files[-1] == str(overlay)
  assert p.gin_params == (
    "core.model.config.ModelConfig.num_layers = 2",
    "core.model.config.ModelConfig.num_kv_heads = 1",
    "core.model.config.ModelConfig.embed_dim = 128",
    f"{SEED_BINDING} = 5",
  )
  assert sweep_lib.baseline_variant(sweep) == "attention=mha,norm=pre,width=64"
  sweep_lib.validate(sweep, points)


def test_baseline_and_overrides(tmp_path):
  path = sweep_file(
    tmp_path, ATTENTION, extra="launch.sweep.Sweep.baseline = {'attention': 'gqa'}\n"
  )
  sweep = sweep_lib.load(str(path), ["launch.sweep.Sweep.seeds = [7]"])
  assert list(sweep.seeds) == [7]
  assert sweep_lib.baseline_variant(sweep) == "attention=gqa"
  assert len(sweep_lib.expand(sweep)) == 3


@pytest.mark.parametrize(
  "axes,seeds,message",
  [
    (
      "{'attention': {'mha': ['ModelConfig.num_kv_head = 4']}}",
      "[0]",
      "axis 'attention' value 'mha'.*num_kv_head",
    ),
    (
      "{'kv': {'binding': 'ModelConfg.num_kv_heads', 'values': [1, 2]}}",
      "[0]",
      "axis 'kv' value '1'.*ModelConfg",
    ),
    (
      "{'pos': {'alibi': ['ModelConfig.position_embedding = \"alibi\"']}}",
      "[0]",
      "axis 'pos' value 'alibi'.*position_embedding must be one of",
    ),
    (
      "{'kv': {'binding': 'core.model.config.ModelConfig.num_kv_heads', 'values': [3]}}",
      "[0]",
      "axis 'kv' value '3'.*multiple of num_kv_heads",
    ),
    (
      "{'v': {'x': ['ablations/variants/no_such_overlay.gin']}}",
      "[0]",
      "axis 'v' value 'x'.*gin file not found",
    ),
    ("{}", "[0]", "grid is empty"),
    (
      "{'kv': {'binding': 'core.model.config.ModelConfig.num_kv_heads', 'values': []}}",
      "[0]",
      "grid is empty",
    ),
    ("{'attention': {}}", "[0]", "grid is empty"),
    (ATTENTION, "[]", "grid is empty"),
    (
      "{'model.norm': {'binding': 'core.model.config.ModelConfig.norm', 'values': ['rmsnorm']}}",
      "[0]",
      "axis names are short identifiers",
    ),
  ],
)
def test_bad_sweeps_fail_before_training(tmp_path, axes, seeds, message):
  with pytest.raises(sweep_lib.SweepError, match=message):
    sweep = sweep_lib.load(str(sweep_file(tmp_path, axes, seeds=seeds)))
    sweep_lib.validate(sweep)


def test_bad_seed_binding_and_baseline(tmp_path):
  path = sweep_file(tmp_path, ATTENTION, extra="launch.sweep.Sweep.seed_binding = 'trian.seed'\n")
  with pytest.raises(sweep_lib.SweepError, match="seed_binding 'trian.seed'"):
    sweep_lib.validate(sweep_lib.load(str(path)))
  path = sweep_file(tmp_path, ATTENTION, extra="launch.sweep.Sweep.baseline = {'attention': 'x'}\n")
  with pytest.raises(sweep_lib.SweepError, match="baseline attention='x'"):
    sweep_lib.load(str(path))


def test_cli_bad_binding_exits_before_any_run(tmp_path, capsys, _mlflow_store):
  path = sweep_file(tmp_path, "{'attention': {'mha': ['ModelConfig.num_kv_head = 4']}}")
  marker = tmp_path / "child-started"
  rc = cli.main(
    ["sweep", str(path), "--workdir", str(tmp_path / "w"), "--train_command", f"touch {marker}"]
  )
  assert rc == 2
  err = capsys.readouterr().err
  assert "axis 'attention' value 'mha'" in err and "num_kv_head" in err
  assert not marker.exists() and not (tmp_path / "w").exists()


def test_dry_run_lists_points_and_runs_nothing(tmp_path, capsys):
  path = sweep_file(tmp_path, ATTENTION)
  rc = cli.main(
    [
      "sweep",
      str(path),
      "--dry-run",
      "--workdir",
      str(tmp_path / "w"),
      "--tracking_uri",
      f"sqlite:///{tmp_path / 'dry.db'}",
    ]
  )
  out = capsys.readouterr().out
  assert rc == 0
  assert "6 points" in out and "attention=mqa" in out and "seed=1" in out
  assert "core.model.config.ModelConfig.num_kv_heads = 2" in out
  assert not (tmp_path / "w").exists() and not (tmp_path / "dry.db").exists()


def test_worker_env_splits_cores_and_gpus():
  env, cpus = sweep_runner.worker_env(
    1, 2, base_env={"XLA_FLAGS": "--xla_foo=1"}, cpus=[0, 1], gpus=[]
  )
  assert cpus == [1]
  assert "--xla_cpu_multi_thread_eigen=false" in env["XLA_FLAGS"]
  assert "intra_op_parallelism_threads=1" in env["XLA_FLAGS"] and "--xla_foo=1" in env["XLA_FLAGS"]
  assert env["OMP_NUM_THREADS"] == "1"
  env, cpus = sweep_runner.worker_env(0, 2, base_env={}, cpus=list(range(8)), gpus=["0", "1"])
  assert cpus == [0, 1, 2, 3] and env["CUDA_VISIBLE_DEVICES"] == "0"
  assert "intra_op_parallelism_threads=4" in env["XLA_FLAGS"]
  env, _ = sweep_runner.worker_env(3, 4, base_env={}, cpus=[0, 1], gpus=["0"])
  assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.23"
  env, cpus = sweep_runner.worker_env(0, 1, base_env={"XLA_FLAGS": "x"}, cpus=[0, 1], gpus=[])
  assert cpus == [] and env["XLA_FLAGS"] == "x"


# A stand-in for `ablax train` with its flags and its resume contract: it logs
# to the MLflow run named in <workdir>/run.json (which the sweep prepared),
# fails once for the point named in $FAKE_FAIL_POINT, records every invocation.
FAKE_TRAIN = r"""
import argparse, json, os, sys
from pathlib import Path
from mlflow.tracking import MlflowClient
from mlflow.entities import Metric
p = argparse.ArgumentParser()
for flag in ("--gin_file", "--gin_param"):
  p.add_argument(flag, action="append", default=[])
for flag in ("--workdir", "--tracking_uri"):
  p.add_argument(flag)
a = p.parse_args()
work = Path(a.workdir)
point = work.name
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps({"point": point, "env": os.environ.get("XLA_FLAGS", ""),
                      "peak": os.environ.get("ABLAX_CPU_PEAK_FLOPS"),
                      "params": a.gin_param}) + "\n")
record = json.loads((work / "run.json").read_text())
assert record["tracking_uri"] == a.tracking_uri
c = MlflowClient(a.tracking_uri)
run_id = record["mlflow_run_id"]
c.update_run(run_id, status="RUNNING")
marker = work / "failed_once"
if os.environ.get("FAKE_FAIL_POINT") == point and not marker.exists():
  marker.write_text("x")
  sys.exit(3)  # dies without closing its run, like a crash
kv = [int(x.split("=")[1]) for x in a.gin_param if "num_kv_heads" in x][0]
seed = [int(x.split("=")[1]) for x in a.gin_param if x.startswith("sample_lines.seed")][0]
metrics = []
for step in (0, 10, 20):
  loss = 5.0 - 0.05 * step + 0.1 * kv + 0.01 * seed
  metrics += [Metric("train/loss", loss, 0, step), Metric("eval/loss", loss + 0.2, 0, step),
              Metric("train/tokens_per_s", 1000.0 * kv, 0, step)]
c.log_batch(run_id, metrics=metrics, synchronous=True)
c.set_terminated(run_id, "FINISHED")
"""


def test_sweep_runs_children_and_resume_skips_finished(tmp_path, capsys, monkeypatch):
  script = tmp_path / "fake_train.py"
  script.write_text(FAKE_TRAIN)
  log = tmp_path / "invocations.jsonl"
  monkeypatch.setenv("FAKE_LOG", str(log))
  axes = (
    "{'attention': {'mha': ['core.model.config.ModelConfig.num_kv_heads = 4'], "
    "'mqa': ['core.model.config.ModelConfig.num_kv_heads = 1']}}"
  )
  path = sweep_file(tmp_path, axes)
  sweep = sweep_lib.load(str(path))
  mqa1 = next(p for p in sweep_lib.expand(sweep) if p.variant == "attention=mqa" and p.seed == 1)
  monkeypatch.setenv("FAKE_FAIL_POINT", mqa1.key)
  # The machine's peak (here given, else measured once by the sweep) is shared out.
  monkeypatch.setenv("ABLAX_CPU_PEAK_FLOPS", "4e11")
  monkeypatch.setattr(sweep_runner, "available_cpus", lambda: [0, 1])
  uri = f"sqlite:///{tmp_path / 'm.db'}"
  argv = [
    "sweep",
    str(path),
    "--workdir",
    str(tmp_path / "w"),
    "--tracking_uri",
    uri,
    "--workers",
    "2",
    "--train_command",
    f"{sys.executable} {script}",
  ]

  assert cli.main(argv + ["--no_compare"]) == 1  # one point failed
  out = capsys.readouterr().out
  assert "3/4 points finished" in out and mqa1.key in out
  first = [json.loads(line) for line in log.read_text().splitlines()]
  assert len(first) == 4
  assert all("intra_op_parallelism_threads=1" in r["env"] for r in first)
  assert all("core.train.loop.train.experiment = 't'" in r["params"] for r in first)
  # One peak for the machine, each of the 2 pinned workers dividing by its half:
  # the MFUs of all points are comparable.
  assert {float(r["peak"]) for r in first} == {2e11}

  state = json.loads((tmp_path / "w" / "sweep.json").read_text())
  parent_id = state["parent_run_id"]
  c = sweep_runner.client(uri)
  assert c.get_run(parent_id).info.status == "FAILED"
  assert c.get_run(parent_id).data.metrics["sweep/cpu_peak_flops"] == 4e11
  done = sweep_runner.finished_points(uri, parent_id)
  assert len(done) == 3 and mqa1.key not in done
  child = c.get_run(done[next(iter(done))])
  assert child.data.tags["mlflow.parentRunId"] == parent_id
  assert set(child.data.params) == {"attention", "seed"}
  # What reproduce needs to rerun it bit for bit: the worker's threads and cores.
  assert "intra_op_parallelism_threads=1" in child.data.tags["ablax.env.XLA_FLAGS"]
  assert child.data.tags["ablax.cpus"] == "1"

  assert cli.main(argv) == 0  # resumes: only the failed point runs again
  out = capsys.readouterr().out
  second = [json.loads(line) for line in log.read_text().splitlines()][len(first) :]
  assert [r["point"] for r in second] == [mqa1.key]
  assert "3 finished before, 1 to run" in out
  assert c.get_run(parent_id).info.status == "FINISHED"
  assert len(sweep_runner.finished_points(uri, parent_id)) == 4
  # The resumed point continued its run rather than starting another.
  assert len(sweep_runner.child_runs(uri, parent_id)) == 4
  # The comparison table is printed and logged, with the UI command.
  assert "attention=mqa" in out and "baseline" in out
  assert f"mlflow ui --backend-store-uri {uri}" in out
  artifacts = {f.path for f in c.list_artifacts(parent_id, "comparison")}
  assert {
    "comparison/loss_curves.png",
    "comparison/forest.png",
    "comparison/table.json",
  } <= artifacts
  # The parent holds the result as metrics: each variant's mean, delta, interval and p.
  parent_metrics = c.get_run(parent_id).data.metrics
  assert parent_metrics["compare/attention_mqa/delta"] == pytest.approx(
    parent_metrics["compare/attention_mqa/mean"] - parent_metrics["compare/attention_mha/mean"]
  )
  assert 0 <= parent_metrics["compare/attention_mqa/p_holm"] <= 1

  # Nothing left to do; a changed definition in the same workdir is refused.
  assert cli.main(argv + ["--no_compare"]) == 0
  assert len(log.read_text().splitlines()) == 5
  assert "4 finished before, 0 to run" in capsys.readouterr().out
  assert cli.main(argv + ["--gin_param", "launch.sweep.Sweep.seeds = [0, 1, 2]"]) == 2
  assert "another definition" in capsys.readouterr().err
  assert len(log.read_text().splitlines()) == 5


def test_seeds_vary_the_init_and_keep_the_data_order_unless_asked():
  base = dict(
    name="s",
    base=["gin/experiments/tiny_llama.gin"],
    axes={"attention": {"mha": [], "mqa": ["core.model.config.ModelConfig.num_kv_heads = 1"]}},
    seeds=[3, 5],
  )
  points = sweep_lib.expand(sweep_lib.Sweep(**base))
  for p in points:
    assert f"core.train.loop.train.seed = {p.seed}" in p.gin_params
    assert "core.train.loop.train.data_seed = 3" in p.gin_params  # one data order for all
  both = sweep_lib.expand(sweep_lib.Sweep(**base, vary_data_seed=True))
  assert [f"core.train.loop.train.data_seed = {p.seed}" in p.gin_params for p in both] == [True] * 4
  assert sweep_lib.definition_hash(sweep_lib.Sweep(**base)) != sweep_lib.definition_hash(
    sweep_lib.Sweep(**base, vary_data_seed=True)
  )


@pytest.mark.parametrize(
  "path", sorted((REPO_ROOT / "ablations").glob("*.gin")), ids=lambda p: p.name
)
def test_every_shipped_sweep_loads_expands_and_validates(path):
  """Each sweep a user can start: its points parse, finalize and build (what --dry-run checks)."""
  sweep = sweep_lib.load(str(path), [])
  points = sweep_lib.expand(sweep)
  assert len(points) >= 2 and sweep.baseline
  sweep_lib.validate(sweep, points)
