"""Scaling fits of a size ladder: the fit against known parameters and scipy, bootstrap coverage,
the ladder's checks, and `ablax compare --scaling` on MLflow runs made the way a ladder sweep makes them."""

import math

import numpy as np
import pytest
from scipy.optimize import curve_fit

from analysis import ladder as ladder_lib
from analysis import runs as runs_lib
from analysis import scaling
from core.tracking.run import RunTracker
from launch import cli

TRUTH = dict(E=1.8, A=3.0e3, alpha=0.3)
SIZES = np.geomspace(1e12, 3e13, 5)


def _points(rng, sigma, seeds, sizes=SIZES, truth=TRUTH):
  return [
    scaling.Run(
      f"s{i}",
      str(j),
      float(c),
      truth["E"] + truth["A"] * c ** -truth["alpha"] + rng.normal(0, sigma),
    )
    for i, c in enumerate(sizes)
    for j in range(seeds)
  ]


def test_fit_recovers_known_parameters():
  # Noise-free: exact to the optimizer's precision; with 0.002-nat noise (seed spread of the tiny
  # ladders is ~0.01) over 5 sizes x 4 seeds: E within 0.05, alpha within 0.05, A within 40%
  # (A and alpha trade off along the curve, so A is the loosest).
  rng = np.random.default_rng(0)
  exact = _points(rng, 0.0, 1)
  f = scaling.fit([p.flops for p in exact], [p.loss for p in exact])
  assert f.E == pytest.approx(TRUTH["E"], rel=1e-6)
  assert f.alpha == pytest.approx(TRUTH["alpha"], rel=1e-6)
  assert f.A == pytest.approx(TRUTH["A"], rel=1e-5)
  noisy = _points(rng, 0.002, 4, sizes=np.geomspace(1e12, 1e15, 5))
  f = scaling.fit([p.flops for p in noisy], [p.loss for p in noisy])
  assert abs(f.E - TRUTH["E"]) < 0.05 and abs(f.alpha - TRUTH["alpha"]) < 0.05
  assert f.A == pytest.approx(TRUTH["A"], rel=0.4)


def test_fit_agrees_with_scipy_curve_fit():
  rng = np.random.default_rng(1)
  pts = _points(rng, 0.01, 2)
  c = np.array([p.flops for p in pts])
  y = np.array([p.loss for p in pts])
  ours = scaling.fit(c, y)
  c0 = float(np.exp(np.mean(np.log(c))))
  (e, a, al), _ = curve_fit(
    lambda x, e, a, al: e + a * (x / c0) ** -al, c, y, p0=[1.0, 1.0, 0.5], maxfev=20000
  )
  assert ours.E == pytest.approx(e, rel=1e-5)
  assert ours.alpha == pytest.approx(al, rel=1e-5)
  assert ours.A == pytest.approx(a * c0**al, rel=1e-4)
  assert ours.rss <= float(((e + a * (c / c0) ** -al - y) ** 2).sum()) * (1 + 1e-9)


@pytest.mark.slow  # 60 trials x 200 refits: ~10 s on an idle core, 30 s on a busy one
def test_bootstrap_interval_covers_the_truth():
  # 4 sizes over 10x compute, 4 seeds each, 0.01-nat seed noise. With 2 seeds per size (the
  # shipped ladders) E's interval covers about 83% of the time: too few seeds to see the noise.
  rng = np.random.default_rng(2)
  sizes = np.geomspace(1e12, 1e13, 4)
  truth = dict(E=1.5, A=400.0, alpha=0.25)
  target = 1e21
  truth_at = truth["E"] + truth["A"] * target ** -truth["alpha"]
  trials, hits = 60, {"E": 0, "alpha": 0, "at": 0}
  for t in range(trials):
    pts = _points(rng, 0.01, 4, sizes=sizes, truth=truth)
    boots = [b for b in scaling.bootstrap({"v": pts}, n_boot=200, seed=t)["v"] if b]
    for k in ("E", "alpha"):
      lo, hi = scaling.percentile_ci([getattr(b, k) for b in boots])
      hits[k] += lo <= truth[k] <= hi
    lo, hi = scaling.percentile_ci([b.predict(target) for b in boots])
    hits["at"] += lo <= truth_at <= hi
  for k, n in hits.items():
    assert n / trials >= 0.90, (k, n / trials)


def test_multiplier_inverts_the_baseline_curve():
  base = scaling.Fit(E=2.0, A=100.0, alpha=0.2, rss=0.0, n=0)
  better = scaling.Fit(E=2.0, A=80.0, alpha=0.2, rss=0.0, n=0)
  # 80 C^-0.2 = 100 (kC)^-0.2  ->  k = (100 / 80)^(1 / 0.2)
  assert scaling.multiplier(base, better, 1e21) == pytest.approx(1.25**5, rel=1e-9)
  floor = scaling.Fit(E=1.0, A=1.0, alpha=0.2, rss=0.0, n=0)
  assert math.isinf(scaling.multiplier(base, floor, 1e21))  # below the baseline's floor


def test_ladders_too_small_or_too_narrow_are_refused():
  rng = np.random.default_rng(3)
  with pytest.raises(scaling.ScalingError, match="2 size"):
    scaling.check_ladder(_points(rng, 0.01, 2, sizes=[1e12, 1e13]))
  with pytest.raises(scaling.ScalingError, match=r"span 3.00x.*at least 4x"):
    scaling.check_ladder(_points(rng, 0.01, 2, sizes=[1e12, 2e12, 3e12]))
  scaling.check_ladder(_points(rng, 0.01, 2, sizes=[1e12, 2e12, 4e12]))


# ------------------------------------------------------------------ MLflow and the CLI


def make_ladder(
  uri,
  tmp_path,
  sizes=SIZES[:4],
  name="lad",
  variants=(("relu", 0.05), ("swiglu", 0.0)),
  seeds=(0, 1),
):
  """A ladder sweep's records: variants x sizes x seeds; relu is 0.05 worse everywhere."""
  runs_lib.client(uri).create_experiment("lad", artifact_location=(tmp_path / "a").as_uri())
  baseline = "activation=relu,size=s0"
  parent = RunTracker(
    uri,
    "lad",
    run_name=name,
    workdir=tmp_path / "sp",
    tags={
      runs_lib.SWEEP_TAG: name,
      runs_lib.ROLE_TAG: "parent",
      runs_lib.BASELINE_TAG: baseline,
      runs_lib.METRIC_TAG: "eval/loss",
    },
  )
  parent_id = parent.start()
  parent.end()
  rng = np.random.default_rng(4)
  index = 0
  for act, shift in variants:
    for i, c in enumerate(sizes):
      for seed in seeds:
        loss = TRUTH["E"] + shift + TRUTH["A"] * c ** -TRUTH["alpha"] + rng.normal(0, 0.003)
        variant = f"activation={act},size=s{i}"
        key = f"{variant}__seed-{seed}"
        t = RunTracker(
          uri,
          "lad",
          run_name=key,
          workdir=tmp_path / f"sp-{key}",
          tags={
            runs_lib.PARENT_TAG: parent_id,
            runs_lib.POINT_TAG: key,
            runs_lib.VARIANT_TAG: variant,
            runs_lib.SEED_TAG: str(seed),
            runs_lib.SWEEP_TAG: name,
            runs_lib.INDEX_TAG: str(index),
          },
        )
        index += 1
        with t:
          t.log_params({"activation": act, "size": f"s{i}", "seed": seed})
          t.log_metrics(
            {"train/flops": float(c), "eval/loss": loss, "energy/energy_kwh": c * 1e-17}, 1
          )
  return parent_id


def test_compare_scaling_cli(tmp_path, capsys):
  uri = f"sqlite:///{tmp_path / 'm.db'}"
  parent_id = make_ladder(uri, tmp_path)
  rc = cli.main(
    [
      "compare",
      "--sweep",
      "lad",
      "--scaling",
      "--tracking_uri",
      uri,
      "--n_boot",
      "200",
      "--plots_dir",
      str(tmp_path / "p"),
    ]
  )
  out = capsys.readouterr().out
  assert rc == 0, out
  assert "activation=relu (baseline)" in out and "the same sign at every size" in out
  assert "Predicted Δ at 1e+21 FLOPs -0.05" in out  # swiglu's floor is 0.05 lower
  assert (tmp_path / "p" / "scaling.png").stat().st_size > 10_000
  c = runs_lib.client(uri)
  m = c.get_run(parent_id).data.metrics
  assert m["scaling/activation_swiglu/delta_at"] == pytest.approx(-0.05, abs=0.01)
  assert (
    m["scaling/activation_swiglu/delta_at_low"]
    <= m["scaling/activation_swiglu/delta_at"]
    <= m["scaling/activation_swiglu/delta_at_high"]
  )
  assert m["scaling/activation_swiglu/sign_stable"] == 1.0
  # swiglu's predicted loss at 1e21 is under relu's floor E: no relu compute matches it.
  assert "activation=swiglu is worth infx compute" in out
  assert "scaling/activation_swiglu/multiplier" not in m  # inf is not logged
  assert (
    m["scaling/activation_relu/E_low"]
    <= m["scaling/activation_relu/E"]
    <= m["scaling/activation_relu/E_high"]
  )
  artifacts = {a.path for a in c.list_artifacts(parent_id, "scaling")}
  assert {"scaling/scaling.png", "scaling/scaling.tex", "scaling/table.json"} <= artifacts
  rc = cli.main(
    [
      "compare",
      "--sweep",
      "lad",
      "--scaling",
      "--tracking_uri",
      uri,
      "--n_boot",
      "50",
      "--format",
      "latex",
      "--no_plots",
      "--no_log",
    ]
  )
  tex = capsys.readouterr().out
  assert rc == 0 and r"\begin{tabular}" in tex and "train FLOPs" in tex and "energy kWh" in tex


def test_compare_scaling_refuses_a_narrow_ladder(tmp_path, capsys):
  uri = f"sqlite:///{tmp_path / 'm.db'}"
  make_ladder(uri, tmp_path, sizes=[1e12, 1.5e12, 2e12], variants=(("relu", 0.0),), seeds=(0,))
  rc = cli.main(["compare", "--sweep", "lad", "--scaling", "--tracking_uri", uri, "--no_plots"])
  err = capsys.readouterr().err
  assert rc == 2 and "span 2.00x in training FLOPs" in err and "Traceback" not in err


def test_strip_size():
  assert ladder_lib.strip_size("activation=relu,size=d32") == "activation=relu"
