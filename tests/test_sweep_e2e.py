"""A real sweep end to end: 2 points x 1 seed of the real trainer, a few steps each, then compare."""

import json
import textwrap

from analysis import runs as runs_lib
from launch import cli

SWEEP = """\
from __gin__ import dynamic_registration
import launch.sweep

launch.sweep.Sweep:
  name = 'e2e'
  base = ['gin/experiments/tiny_llama.gin']
  params = [
      'core.model.config.ModelConfig.num_layers = 1',
      'core.train.loop.train.num_steps = 3',
      'core.train.loop.train.log_every = 1',
      'core.train.loop.train.eval_every = 0',
      'core.train.loop.train.eval_batches = 1',
      'core.train.loop.train.checkpoint_every = 0',
      'core.train.loop.train.export_model = False',
  ]
  axes = {'attention': {'mha': ['core.model.config.ModelConfig.num_kv_heads = 4'],
                        'mqa': ['ablations/variants/mqa.gin']}}
  seeds = [0]
"""


def test_real_sweep_two_points(tmp_path, capsys, monkeypatch):
  # One device per child: the 8 fake devices of the test process only slow compilation here.
  monkeypatch.setenv("XLA_FLAGS", "")
  path = tmp_path / "e2e.gin"
  path.write_text(textwrap.dedent(SWEEP))
  uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
  rc = cli.main(
    ["sweep", str(path), "--workdir", str(tmp_path / "w"), "--tracking_uri", uri, "--workers", "2"]
  )
  out = capsys.readouterr().out
  logs = "".join(p.read_text()[-2000:] for p in (tmp_path / "w" / "logs").glob("*.log"))
  assert rc == 0, out + logs
  assert "2/2 points finished" in out and f"mlflow ui --backend-store-uri {uri}" in out

  c = runs_lib.client(uri)
  parent = runs_lib.find_sweep(c, "e2e")
  children = runs_lib.sweep_children(c, parent)
  assert sorted(r.data.params["attention"] for r in children) == ["mha", "mqa"]
  for run in children:
    assert run.info.status == "FINISHED"
    assert run.data.params["model.num_kv_heads"] in ("1", "4")
    assert len(c.get_metric_history(run.info.run_id, "train/loss")) == 3
    assert "eval/loss" in run.data.metrics
    # The child ran in the sweep's run: the trainer continued the run the sweep created.
    record = json.loads(
      (tmp_path / "w" / run.data.tags[runs_lib.POINT_TAG] / "run.json").read_text()
    )
    assert record["mlflow_run_id"] == run.info.run_id
  mqa = next(r for r in children if r.data.params["attention"] == "mqa")
  assert mqa.data.params["model.num_kv_heads"] == "1"
  # The table came from MLflow: both variants, the baseline first, run ids cited.
  table = out[out.index("sweep e2e (parent run") :]
  assert table.index("attention=mha") < table.index("attention=mqa")
  assert mqa.info.run_id[:8] in table
