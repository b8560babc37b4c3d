"""`ablax plan`: the real train step compiled for TPU slices and GPU nodes on this CPU machine."""

import json
import os

import jax
import numpy as np
import pytest
from jax.experimental import mesh_utils

from core.plan import targets
from core.train import mesh as meshlib
from launch import cli

TINY = ["--gin_file", "gin/experiments/tiny_gemma2.gin"]
GEMMA2_2B = [
  "--gin_file",
  "gin/models/gemma2_2b.gin",
  "--gin_file",
  "gin/train/base.gin",
  "--gin_file",
  "gin/train/llama_adamw.gin",
  "--gin_file",
  "gin/train/bf16.gin",
  "--gin_param",
  "core.train.loop.train.num_steps = 100",
]


@pytest.mark.parametrize(
  "name, devices, topology, shape",
  [
    ("v5e-4", 4, "v5e:2x2", (2, 2)),
    ("v5e-256", 256, "v5e:16x16", (16, 16)),
    ("v6e-8", 8, "v6e:2x4", (2, 4)),
    ("v4-32", 16, "v4:2x2x4", (2, 2, 4)),
    ("v5p-128", 64, "v5:4x4x4", (4, 4, 4)),
    ("v5p-512", 256, "v5:4x8x8", (4, 8, 8)),
    ("h100x8", 8, "", (1, 1, 8)),
    ("h200x16", 16, "", (2, 1, 8)),
  ],
)
def test_target_names_follow_cloud_tpu_and_node_conventions(name, devices, topology, shape):
  target = targets.parse_target(name)
  assert (target.num_devices, target.topology_name, target.shape) == (devices, topology, shape)


@pytest.mark.parametrize(
  "name, match",
  [
    ("v5p-127", "two per chip"),
    ("v5e-12", "power-of-two"),
    ("h100x12", "multiple"),
    ("tpu-v9", "unknown target"),
  ],
)
def test_bad_target_names_are_clear_errors(name, match):
  with pytest.raises(targets.TargetError, match=match):
    targets.parse_target(name)


def test_the_mesh_of_a_topology_is_jax_make_mesh_s():
  before = dict(os.environ)
  devices = targets.parse_target("v5p-128").devices()
  # libtpu's start-up variables do not outlive it: left behind, they make JAX in this
  # process and its children take the machine for a TPU pod.
  assert dict(os.environ) == before
  ours = meshlib.make_mesh(meshlib.MeshConfig(data=4, fsdp=4, tensor=4), devices)
  theirs = jax.make_mesh(
    (4, 4, 4), meshlib.AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  assert [d.id for d in ours.devices.flat] == [d.id for d in theirs.devices.flat]
  # The ICI-aware order is not the list order: a mesh built from the list would differ.
  assert [d.id for d in ours.devices.flat] != [d.id for d in devices]
  # An 8-way axis does not map onto whole axes of the 4x4x4 torus: split ones, as
  # mesh_utils does when asked, rather than an error.
  split = meshlib.make_mesh(meshlib.MeshConfig(data=2, fsdp=8, tensor=4), devices)
  expect = mesh_utils.create_device_mesh((2, 8, 4), devices, allow_split_physical_axes=True)
  assert [d.id for d in split.devices.flat] == [d.id for d in expect.flat]


def plan(capsys, tmp_path, *argv):
  out = tmp_path / "plan.json"
  rc = cli.main(["plan", *argv, "--json", str(out)])
  text = capsys.readouterr()
  return rc, text.out + text.err, (json.loads(out.read_text()) if out.exists() else None)


def test_a_tiny_preset_compiles_for_a_v5e_slice_and_is_recorded(capsys, tmp_path, _mlflow_store):
  rc, out, record = plan(
    capsys, tmp_path, *TINY, "--target", "v5e-4", "--log", "--device_power_w", "170"
  )
  assert rc == 0, out
  step = record["plan"]
  assert (
    step["platform"] == "tpu"
    and step["fits"]
    and step["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  )
  assert 0 < step["argument_bytes"] < step["peak_bytes"] < step["usable_bytes"]
  # XLA's count of the compiled program against 6N + attention: the same step, so close.
  assert 0.9 < step["xla_flops"] / step["model_flops"] < 1.5
  assert "verdict: fits" in out and "tokens/s" in out and "CO2eq" in out
  run = record["run"]
  assert run["power_w"] == 170 and run["energy_mwh"] > 0 and run["co2_tonnes"] > 0
  # --log: one finished MLflow run holding the inputs, the figures and the whole plan.
  from mlflow.tracking import MlflowClient

  client = MlflowClient(_mlflow_store)
  (found,) = client.search_runs([client.get_experiment_by_name("tiny_gemma2-plan").experiment_id])
  assert found.info.status == "FINISHED" and found.data.tags["ablax.kind"] == "plan"
  assert found.data.params["target"] == "v5e-4" and found.data.params["mesh.fsdp"] == "4"
  assert found.data.metrics["plan/peak_bytes"] == step["peak_bytes"]
  assert [a.path for a in client.list_artifacts(found.info.run_id)] == ["plan.json"]


def test_a_tiny_preset_compiles_for_an_h100_node(capsys, tmp_path):
  rc, out, record = plan(capsys, tmp_path, *TINY, "--target", "h100x8", "--mesh", "1,4,2")
  assert rc == 0, out
  step = record["plan"]
  assert step["platform"] == "gpu" and step["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  assert step["verdict_by"] == "peak vs usable" and step["fits"]
  assert step["usable_bytes"] == int(84942979072 * 0.75)
  assert step["xla_flops"] is None  # the GPU backend has no cost analysis
  assert "does not check memory" in out


def test_gemma2_2b_at_16x2048_does_not_fit_a_v5e_4_and_the_compiler_says_by_how_much(
  capsys, tmp_path
):
  # Scanned layers: the same verdict as unrolled, compiled in seconds instead of minutes.
  rc, out, record = plan(
    capsys,
    tmp_path,
    *GEMMA2_2B,
    "--gin_file",
    "gin/train/remat_save_dots.gin",
    "--gin_param",
    "core.model.config.ModelConfig.scan_layers = True",
    "--target",
    "v5e-4",
    "--batch",
    "16",
    "--seq",
    "2048",
  )
  assert rc == 1, out
  step = record["plan"]
  assert not step["fits"] and step["verdict_by"] == "compiler"
  assert "RESOURCE_EXHAUSTED" in step["message"]
  # The compiler's own figures: what it needed and the chip's 15.75 GiB.
  assert step["usable_bytes"] == int(15.75 * 2**30)
  assert step["used_bytes"] > step["usable_bytes"]
  assert np.isclose(step["overflow_bytes"], step["used_bytes"] - step["usable_bytes"])
  assert "does NOT fit" in out


@pytest.mark.parametrize(
  "argv, match",
  [
    (["--target", "v5e-3"], "power-of-two"),
    (["--target", "v5e-4", "--mesh", "1,-1,3"], "cannot be split"),
    (["--target", "v5e-4", "--mesh", "1,3,1"], "has 3 devices, but 4"),
    (["--target", "v5e-4", "--mesh", "1,x"], "three integers"),
  ],
)
def test_bad_plan_input_is_one_line_and_exit_2(capsys, tmp_path, argv, match):
  rc, out, record = plan(capsys, tmp_path, *TINY, *argv)
  assert rc == 2 and match in out and "Traceback" not in out and record is None
