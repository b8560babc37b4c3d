"""ablax compare: statistics over seeds, deltas with intervals, formats and plots, on real MLflow runs.

The runs are created through the tracking API (core.tracking.run.RunTracker)
the way a sweep creates them; expected numbers are computed by hand below.
"""

import csv
import io
import math

import pytest
from scipy import stats as scipy_stats

from analysis import compare as compare_lib
from analysis import runs as runs_lib
from analysis import table as table_lib
from core.tracking.run import RunTracker
from launch import cli

# Two-sided 95% Student-t quantiles t(0.975, df) from a printed table.
T975 = {1: 12.7062047361747, 2: 4.30265272974946, 4: 2.77644510519779, 9: 2.26215716279820}

# variant -> {seed: final eval/loss}; gqa lacks seed 2, so its delta is unpaired.
FINALS = {
  "attention=mha": {0: 2.0, 1: 2.2, 2: 2.1},
  "attention=mqa": {0: 2.3, 1: 2.4, 2: 2.2},
  "attention=gqa": {0: 2.1, 1: 2.5},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """One store with the sweep for the whole module (creating runs is the slow part)."""
  tmp = tmp_path_factory.mktemp("compare")
  uri = f"sqlite:///{tmp / 'mlflow.db'}"
  return uri, make_sweep(uri, tmp)


def make_sweep(uri, tmp_path, name="attn"):
  # Created here so that artifacts stay in tmp_path (MLflow's default is ./mlruns of the cwd).
  runs_lib.client(uri).create_experiment(
    "ablations", artifact_location=(tmp_path / "artifacts").as_uri()
  )
  parent = RunTracker(
    uri,
    "ablations",
    run_name=name,
    workdir=tmp_path / "run-parent",
    tags={
      runs_lib.SWEEP_TAG: name,
      runs_lib.ROLE_TAG: "parent",
      runs_lib.BASELINE_TAG: "attention=mha",
      runs_lib.METRIC_TAG: "eval/loss",
    },
  )
  parent_id = parent.start()
  parent.end()
  for variant, seeds in FINALS.items():
    for seed, final in seeds.items():
      key = f"{variant}__seed-{seed}"
      t = RunTracker(
        uri,
        "ablations",
        run_name=key,
        workdir=tmp_path / f"run-{key}",
        tags={
          runs_lib.PARENT_TAG: parent_id,
          runs_lib.POINT_TAG: key,
          runs_lib.VARIANT_TAG: variant,
          runs_lib.SEED_TAG: str(seed),
          runs_lib.SWEEP_TAG: name,
          "ablax.config_hash": f"h-{variant.split('=')[1]}",
        },
      )
      with t:
        t.log_params({"attention": variant.split("=")[1], "seed": seed})
        for step in (0, 50, 100):
          t.log_metrics(
            {
              "train/loss": final + 1.0 - step / 100,
              "eval/loss": final + (100 - step) / 50,
              "train/tokens_per_s": 999.0 if step == 0 else 1000.0 + seed,
              "train/mfu": 0.01 if step == 0 else 0.02,
              "energy/energy_kwh": step * 1e-4,
              "energy/co2_kg": step * 4e-5,
            },
            step,
          )
  return parent_id


def test_statistics_by_hand(store):
  uri, parent_id = store
  c = runs_lib.client(uri)
  comp = compare_lib.compare(c, sweep="attn")
  table = comp.table
  assert comp.parent.info.run_id == parent_id
  assert [r.variant for r in table.rows] == ["attention=mha", "attention=mqa", "attention=gqa"]

  mha, mqa, gqa = (table.row(v) for v in FINALS)
  assert mha.baseline and mha.n == 3 and mha.seeds == ["0", "1", "2"]
  assert mha.mean == pytest.approx((2.0 + 2.2 + 2.1) / 3)
  assert mha.std == pytest.approx(math.sqrt((0.1**2 + 0.1**2 + 0) / 2))
  assert mha.ppl_mean == pytest.approx((math.exp(2.0) + math.exp(2.2) + math.exp(2.1)) / 3)

  # mqa shares mha's seeds: paired differences 0.3, 0.2, 0.1 -> mean 0.2, sd 0.1, df 2.
  assert mqa.delta.method == "paired"
  assert mqa.delta.value == pytest.approx(0.2)
  half = T975[2] * 0.1 / math.sqrt(3)
  assert (mqa.delta.low, mqa.delta.high) == pytest.approx((0.2 - half, 0.2 + half))
  # t = 0.2 / (0.1 / sqrt 3); with 2 degrees of freedom the two-sided p is 1 - t / sqrt(2 + t^2).
  t = 0.2 / (0.1 / math.sqrt(3))
  p_mqa = 1 - t / math.sqrt(2 + t * t)
  assert mqa.delta.p == pytest.approx(p_mqa, rel=1e-9)

  # gqa has seeds 0, 1 only: Welch's interval.
  va, vb = 0.08 / 2, 0.01 / 3  # sample variances over n
  df = (va + vb) ** 2 / (va**2 / 1 + vb**2 / 2)
  half = scipy_stats.t.ppf(0.975, df) * math.sqrt(va + vb)
  assert gqa.delta.method == "welch"
  assert gqa.delta.value == pytest.approx(2.3 - 2.1)
  assert (gqa.delta.low, gqa.delta.high) == pytest.approx((0.2 - half, 0.2 + half))
  p_gqa = 2 * scipy_stats.t.sf(0.2 / math.sqrt(va + vb), df)
  assert gqa.delta.p == pytest.approx(p_gqa, rel=1e-9)
  # Holm over the two variants: the smaller p times 2, the larger times 1, kept monotone.
  small, large = sorted([p_mqa, p_gqa])
  want = {p_mqa: None, p_gqa: None}
  want[small] = min(1.0, 2 * small)
  want[large] = max(want[small], large)
  assert mqa.delta.p_holm == pytest.approx(want[p_mqa]) and gqa.delta.p_holm == pytest.approx(
    want[p_gqa]
  )

  # Throughput and MFU leave out the first (compiling) step; energy is per run.
  assert mha.tokens_per_s == pytest.approx(1001.0)
  assert mha.mfu == pytest.approx(0.02)
  assert mha.energy_kwh == pytest.approx(0.01) and mha.carbon_kg == pytest.approx(0.004)
  assert len(mha.run_ids) == 3 and mha.config_hashes == ["h-mha"]


def test_formats(store):
  table = compare_lib.compare(runs_lib.client(store[0]), sweep="attn").table
  mqa = table.row("attention=mqa")

  md = table_lib.render(table, "markdown").splitlines()
  assert md[0].startswith("| variant | seeds | final eval/loss |") and md[1].startswith("|---|")
  row = next(line for line in md if line.startswith("| attention=mqa"))
  assert f"`{mqa.run_ids[0]}`" in row and "+0.2000" in row and "2.3000 ± 0.1000" in row

  tex = table_lib.render(table, "latex")
  assert r"\begin{tabular}" in tex and r"\end{tabular}" in tex
  assert r"attention=mqa & 3 & 2.3000 $\pm$ 0.1000" in tex
  assert r"\texttt{h-mqa}" in tex and r"eval/loss" in tex and "_" not in tex.replace(r"\_", "")
  assert r"$\Delta$ vs baseline & 95\% CI" in tex

  rows = list(csv.DictReader(io.StringIO(table_lib.render(table, "csv"))))
  assert [r["variant"] for r in rows] == list(FINALS)
  got = rows[1]
  assert float(got["mean"]) == pytest.approx(2.3) and float(got["delta"]) == pytest.approx(0.2)
  assert float(got["ci95_low"]) == pytest.approx(mqa.delta.low)
  assert got["run_ids"].split() == mqa.run_ids and got["baseline"] == "0"
  assert rows[0]["baseline"] == "1" and rows[0]["delta"] == "0.0"


def test_cli_plots_are_written_and_logged(tmp_path, capsys, store):
  uri, parent_id = store
  rc = cli.main(
    [
      "compare",
      "--sweep",
      parent_id,
      "--format",
      "markdown",
      "--tracking_uri",
      uri,
      "--plots_dir",
      str(tmp_path / "plots"),
      "--output",
      str(tmp_path / "t.md"),
    ]
  )
  assert rc == 0
  out = capsys.readouterr()
  assert "| attention=gqa |" in out.out and (tmp_path / "t.md").read_text() == out.out[:-1]
  assert f"mlflow ui --backend-store-uri {uri}" in out.err
  for name in ("loss_curves.png", "final_eval_loss.png"):
    data = (tmp_path / "plots" / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
  c = runs_lib.client(uri)
  logged = {f.path for f in c.list_artifacts(parent_id, "comparison")}
  assert {
    "comparison/loss_curves.png",
    "comparison/final_eval_loss.png",
    "comparison/comparison.csv",
    "comparison/comparison.tex",
  } <= logged


def test_experiment_filter_and_group_by(capsys, store):
  rc = cli.main(
    [
      "compare",
      "--experiment",
      "ablations",
      "--tracking_uri",
      store[0],
      "--filter",
      "params.seed != '2'",
      "--group_by",
      "attention",
      "--baseline",
      "attention=mqa",
      "--format",
      "csv",
      "--no_plots",
    ]
  )
  assert rc == 0
  rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
  assert {r["variant"]: r["n"] for r in rows} == {
    "attention=mha": "2",
    "attention=mqa": "2",
    "attention=gqa": "2",
  }
  assert next(r for r in rows if r["variant"] == "attention=mqa")["baseline"] == "1"


def test_unknown_sweep_or_metric_is_a_clear_error(capsys, store):
  uri = ["--tracking_uri", store[0], "--no_plots"]
  assert cli.main(["compare", "--sweep", "atn", *uri]) == 2
  err = capsys.readouterr().err
  assert "no sweep named 'atn'" in err and "sweeps in this store: attn" in err
  assert cli.main(["compare", "--sweep", "0" * 32, *uri]) == 2
  assert "not found" in capsys.readouterr().err
  assert cli.main(["compare", "--sweep", "attn", "--metric", "eval/acc", *uri]) == 2
  assert "no metric 'eval/acc'" in capsys.readouterr().err


def test_compute_matched_comparison_by_hand(tmp_path, capsys):
  """Two variants at equal training FLOPs: the costlier one has done fewer steps there."""
  uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
  runs_lib.client(uri).create_experiment("cm", artifact_location=(tmp_path / "a").as_uri())
  # 'cheap' costs 100 FLOPs per token, 'dear' 200; 2 rows x 5 tokens per step, eval/loss
  # logged at steps 0, 10, 20 falling linearly by 0.1 per step from its start.
  start = {"cheap": {0: 5.0, 1: 5.2}, "dear": {0: 4.0, 1: 4.4}}
  for variant, fpt in (("cheap", 100.0), ("dear", 200.0)):
    for seed in (0, 1):
      t = RunTracker(
        uri,
        "cm",
        run_name=f"{variant}-{seed}",
        workdir=tmp_path / f"s{variant}{seed}",
        tags={runs_lib.VARIANT_TAG: variant, runs_lib.SEED_TAG: str(seed)},
      )
      t.start()
      t.log_params(
        {"train.global_batch": 2, "train.seq_len": 5, "flops_per_token": fpt, "seed": seed}
      )
      for step in (0, 10, 20):
        t.log_metrics({"eval/loss": start[variant][seed] - 0.1 * step, "eval/loss_se": 0.5}, step)
      t.end("FINISHED")
  c = runs_lib.client(uri)
  # 12,000 FLOPs: cheap at 12000 / (10 tokens x 100) = step 12, dear at step 6.
  comp = compare_lib.compare(
    c, experiment="cm", metric="eval/loss", baseline="cheap", at=("flops", 12000.0)
  )
  cheap, dear = comp.table.row("cheap"), comp.table.row("dear")
  assert cheap.final == pytest.approx([5.0 - 1.2, 5.2 - 1.2])
  assert dear.final == pytest.approx([4.0 - 0.6, 4.4 - 0.6])
  assert dear.delta.value == pytest.approx((3.4 + 3.8) / 2 - (3.8 + 4.0) / 2)
  assert comp.table.match == "flops=1.2e+04"
  # An eval set with a standard error of 0.5 cannot resolve a delta of 0.3: said, not hidden.
  assert cheap.eval_se == 0.5
  assert comp.table.unresolved() == ["dear (|Δ| 0.3000 < 1.4142)"]
  assert "WARNING: the eval set cannot resolve dear" in table_lib.render(comp.table, "text")
  # At equal steps the same runs give another answer: the match matters.
  by_step = compare_lib.compare(
    c, experiment="cm", metric="eval/loss", baseline="cheap", at=("step", 12.0)
  )
  assert by_step.table.row("dear").final == pytest.approx([4.0 - 1.2, 4.4 - 1.2])
  # The default (final) table also matches compute: at 20,000 FLOPs, the largest budget both
  # reached, cheap is at its last step (20) and dear at step 10.
  final = compare_lib.compare(c, experiment="cm", metric="eval/loss", baseline="cheap")
  assert final.table.matched == ("flops", 20000.0)
  assert final.table.row("dear").final == pytest.approx([4.0 - 2.0, 4.4 - 2.0])
  assert final.table.row("dear").matched == pytest.approx([4.0 - 1.0, 4.4 - 1.0])
  assert final.table.row("cheap").matched == pytest.approx([5.0 - 2.0, 5.2 - 2.0])
  assert final.table.row("dear").matched_delta.value == pytest.approx(3.2 - 3.1)
  text = table_lib.render(final.table, "text")
  assert "at flops=2e+04" in text and "Δ at flops" in text
  assert "matched_delta" in table_lib.render(final.table, "csv")
  # Outside a run's curve is an error, never an extrapolation.
  with pytest.raises(ValueError, match="outside"):
    compare_lib.compare(c, experiment="cm", metric="eval/loss", at=("flops", 30000.0))
  # Through the command: the table says which match it used, and the plots include the
  # compute axes and the forest plot.
  rc = cli.main(
    [
      "compare",
      "--experiment",
      "cm",
      "--tracking_uri",
      uri,
      "--metric",
      "eval/loss",
      "--baseline",
      "cheap",
      "--at",
      "tokens=120",
      "--x",
      "tokens",
      "--plots_dir",
      str(tmp_path / "p"),
    ]
  )
  out = capsys.readouterr()
  assert rc == 0, out.err
  assert "at tokens=120: eval/loss" in out.out and "p (Holm)" in out.out
  assert {"loss_curves.png", "loss_vs_flops.png", "forest.png"} <= {
    p.name for p in (tmp_path / "p").iterdir()
  }
