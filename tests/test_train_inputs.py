"""Bad run inputs fail before anything is built: carbon inputs, a tokenizer that does not fit."""

import functools
import types

import pytest

from core.tokenizer import VocabMismatchError
from core.tracking.carbon import CarbonInputError
from core.train import loop, optimizer
from core.train.synthetic import SyntheticBatches
from tests.tiny_model import tiny_config

CONFIG = tiny_config(
  vocab_size=64,
  embed_dim=16,
  num_layers=1,
  num_heads=2,
  mlp_dim=32,
  max_seq_len=16,
  activation="swiglu",
  scale_embeddings=False,
)


def run(tmp_path, data=None, **kwargs):
  data = data or functools.partial(SyntheticBatches, vocab_size=64, seq_len=16)
  return loop.train(
    model=CONFIG,
    data=lambda **kw: data(**{k: v for k, v in kw.items() if k in ("batch_size", "seed")}),
    optimizer=optimizer.llama_adamw,
    num_steps=2,
    batch_size=2,
    workdir=tmp_path / "run",
    export_model=False,
    progress=False,
    **{"track": False, **kwargs},
  )


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(grid_region="mars"), "unknown region 'mars'"),
    (dict(grid_region="world-2022", grid_intensity=300.0), "not both"),
    (dict(pue=0.9), "PUE must be a number >= 1.0"),
    (dict(grid_intensity=-5.0), "intensity"),
    (dict(device_power_w=-1.0), "device_power_w must be positive"),
  ],
)
def test_bad_carbon_inputs_fail_before_the_run_starts(tmp_path, kwargs, message):
  with pytest.raises(CarbonInputError, match=message):
    run(tmp_path, **kwargs)
  assert not (tmp_path / "run").exists()


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
  def data(**kw):
    batches = SyntheticBatches(vocab_size=64, seq_len=16, **kw)
    batches.tokenizer = types.SimpleNamespace(vocab_size=100)
    return batches

  with pytest.raises(VocabMismatchError, match="vocab_size is 64"):
    run(tmp_path, data=data)


def test_carbon_is_recorded_with_the_grid_region_and_pue(tmp_path):
  import mlflow

  uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
  result = run(tmp_path, grid_region="europe-north1", pue=1.1, track=True, tracking_uri=uri)
  assert result.status == "FINISHED"
  metrics = mlflow.MlflowClient(uri).get_run(result.run_id).data.metrics
  raw, scaled = metrics["energy/energy_kwh"], metrics["energy/energy_kwh_pue"]
  assert raw > 0 and scaled == pytest.approx(1.1 * raw)
  # europe-north1: 46 g CO2eq/kWh (Google Cloud 2023 region table).
  assert metrics["energy/co2_kg"] == pytest.approx(scaled * 0.046)


def test_data_seed_fixes_the_data_order_while_seed_changes_the_init(tmp_path):
  seen = []

  def data(**kw):
    seen.append((kw["split"], kw["seed"]))
    return SyntheticBatches(
      vocab_size=64, seq_len=16, batch_size=kw["batch_size"], seed=kw["seed"], split=kw["split"]
    )

  runs = {}
  for seed in (0, 1):
    seen.clear()
    result = loop.train(
      model=CONFIG,
      data=data,
      optimizer=optimizer.llama_adamw,
      num_steps=2,
      batch_size=2,
      seed=seed,
      data_seed=7,
      eval_batches=1,
      workdir=tmp_path / f"s{seed}",
      export_model=False,
      progress=False,
      track=False,
    )
    runs[seed] = result
    # Training and validation data both follow data_seed, not the init seed.
    assert set(seen) == {("train", 7), ("validation", 7)}
  # Same batches, other weights: the losses differ from the first step on.
  assert runs[0].losses[1] != runs[1].losses[1]
