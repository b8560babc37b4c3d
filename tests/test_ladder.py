"""Size ladders in a sweep: shape checks, budgets and steps, the shipped ladders, a real tiny ladder."""

import textwrap

import pytest

from analysis import ladder as ladder_lib
from analysis import runs as runs_lib
from launch import cli
from launch import sweep as sweep_lib

SIZE = [
  "core.model.config.ModelConfig.embed_dim = {d}",
  "core.model.config.ModelConfig.num_layers = 1",
  "core.model.config.ModelConfig.num_heads = {h}",
  "core.model.config.ModelConfig.num_kv_heads = {h}",
]


def _sweep(**ladder):
  sizes = {f"d{d}": [b.format(d=d, h=d // 32) for b in SIZE] for d in (32, 64, 128)}
  return sweep_lib.Sweep(
    name="lt",
    base=["gin/experiments/tiny_llama.gin"],
    axes={"act": {"swiglu": [], "relu": ["core.model.config.ModelConfig.activation = 'relu'"]}},
    seeds=[0, 1],
    ladder={"sizes": sizes, **ladder},
  )


def test_budget_steps_and_warmup_follow_the_rule():
  points = sweep_lib.expand(_sweep(tokens_per_param=20))
  assert len(points) == 2 * 3 * 2 and points[0].choices == (("act", "swiglu"), ("size", "d32"))
  from launch import ladder

  sizes = ladder.sizes(
    _sweep(tokens_per_param=20), sweep_lib.check_shape(_sweep(tokens_per_param=20))
  )
  for s in sizes:
    assert s.steps == round(20 * s.non_embedding / (8 * 128))  # tiny_llama: 8 x 128 tokens a step
    assert s.warmup_steps == round(0.1 * s.steps)  # tiny_llama's 30 / 300
    assert f"core.train.loop.train.num_steps = {s.steps}" in [
      p for pt in points if dict(pt.choices)["size"] == s.label for p in pt.gin_params
    ]


@pytest.mark.parametrize(
  "ladder, message",
  [
    ({"tokens_per_param": 20, "tokens": {}}, "exactly one budget"),
    ({}, "exactly one budget"),
    ({"tokens": {"d32": 1e5}}, "every size its budget"),
    ({"tokens_per_param": -1}, "positive number"),
    ({"tokens_per_param": 20, "warmup": 0.1}, "unknown key"),
  ],
)
def test_malformed_ladders_are_refused(ladder, message):
  with pytest.raises(sweep_lib.SweepError, match=message):
    sweep_lib.check_shape(_sweep(**ladder))


def test_shipped_ladders_dry_run(capsys):
  for name in ("ladder_activation", "ladder_attention"):
    rc = cli.main(["sweep", f"ablations/{name}.gin", "--dry-run", "--workers", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "4 sizes, budget 20 tokens per non-embedding parameter" in out
    span = float(out.split("training FLOPs span ")[1].split("x")[0])
    minutes = float(out.split("about ")[1].split(" min wall")[0])
    assert span >= 10 and minutes <= 30, (name, span, minutes)


@pytest.mark.slow  # 6 children of `ablax train`: ~1 min on 2 idle cores, several on busy ones
def test_real_tiny_ladder_end_to_end(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")
  sizes = "\n".join(
    f"          'd{d}': {[b.format(d=d, h=d // 32) for b in SIZE]!r}," for d in (32, 64, 128)
  )
  path = tmp_path / "lt.gin"
  path.write_text(
    textwrap.dedent("""\
  from __gin__ import dynamic_registration
  import launch.sweep

  launch.sweep.Sweep:
    name = 'lt'
    base = ['gin/experiments/tiny_llama.gin']
    params = ['core.train.loop.train.eval_every = 0', 'core.train.loop.train.eval_batches = 2',
              'core.train.loop.train.checkpoint_every = 0',
              'core.train.loop.train.export_model = False', 'core.train.loop.train.log_every = 5']
    axes = {'act': {'swiglu': [], 'relu': ["core.model.config.ModelConfig.activation = 'relu'"]}}
    seeds = [0]
    ladder = {
        'sizes': {
  """)
    + sizes
    + "\n      },\n      'tokens': {'d32': 10240, 'd64': 20480, 'd128': 30720},\n  }\n"
  )
  uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
  rc = cli.main(
    ["sweep", str(path), "--workdir", str(tmp_path / "w"), "--tracking_uri", uri, "--workers", "2"]
  )
  out = capsys.readouterr().out
  assert rc == 0, out
  assert "6/6 points finished" in out and "Fits:" in out and "Predicted Δ at 1e+21" in out
  assert (tmp_path / "w" / "scaling" / "scaling.png").is_file()
  parent = runs_lib.find_sweep(runs_lib.client(uri), "lt")
  assert "scaling/act_relu/alpha" in parent.data.metrics
  assert ladder_lib.strip_size("act=relu,size=d32") == "act=relu"
