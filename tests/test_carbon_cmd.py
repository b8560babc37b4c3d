"""`ablax carbon`: published tables from the command line, the FLOPs path, bad input."""

import json
import math

import pytest

from launch import cli


def _run(capsys, *argv):
  code = cli.main(["carbon", *argv])
  out = capsys.readouterr()
  return code, out.out, out.err


def _json(capsys, *argv):
  code, out, err = _run(capsys, *argv, "--json")
  assert code == 0, err
  return json.loads(out)


def test_llama_65b_table15(capsys):
  # LLaMA paper Table 15: 1,022,362 GPU-hours -> 449 MWh, 173 tCO2eq.
  r = _json(
    capsys,
    "--device",
    "A100",
    "--device_hours",
    "1,022,362",
    "--pue",
    "1.1",
    "--intensity",
    "0.385",
  )
  assert math.floor(r["energy_mwh"]) == 449 and round(r["co2_tonnes"]) == 173
  assert r["power_w"] == 400


def test_llama2_34b_table2_with_hours_and_count(capsys):
  # Llama 2 Table 2, 34B: 1,038,336 GPU-hours at 350 W -> 153.90 t (truncated).
  # The same device-hours as 1024 GPUs x 1014 h.
  r = _json(
    capsys,
    "--device",
    "NVIDIA A100-SXM4-80GB",
    "--count",
    "1024",
    "--hours",
    "1014",
    "--power_w",
    "350",
    "--pue",
    "1.1",
    "--intensity",
    "0.385",
  )
  assert r["device_hours"] == 1_038_336
  assert math.floor(r["co2_tonnes"] * 100) / 100 == 153.90
  assert "user-supplied" in r["power_source"]


def test_text_output_names_sources(capsys):
  code, out, _ = _run(
    capsys,
    "--device",
    "H100",
    "--count",
    "64",
    "--hours",
    "100",
    "--pue",
    "1.2",
    "--region",
    "europe-west9",
  )
  assert code == 0
  assert "448.00 kWh" not in out and "4.48 MWh at the devices" in out  # 64 x 100 h x 700 W
  assert "5.38 MWh with PUE 1.2" in out
  assert "region-carbon-info" in out and "183 kg CO2eq" in out  # 5.376 MWh x 34 g/kWh


def test_small_runs_in_kwh_and_kg(capsys):
  code, out, _ = _run(
    capsys,
    "--device",
    "cpu",
    "--hours",
    "2",
    "--power_w",
    "150",
    "--pue",
    "1.5",
    "--region",
    "europe-west9",
  )
  assert code == 0 and "0.3 kWh at the devices; 0.45 kWh with PUE 1.5" in out
  assert "0.0153 kg CO2eq" in out  # 0.45 kWh x 34 g/kWh


def test_without_intensity_only_energy(capsys):
  code, out, _ = _run(capsys, "--device", "v4", "--count", "4", "--hours", "10")
  assert code == 0 and "not computed" in out and "192 W" in out


def test_from_a_gin_config(capsys):
  from core.model.flops import flops_per_token

  r = _json(
    capsys,
    "--gin_file",
    "gin/models/llama_7b.gin",
    "--tokens",
    "1T",
    "--mfu",
    "0.5",
    "--device",
    "a100",
    "--count",
    "2048",
    "--pue",
    "1.1",
    "--intensity",
    "0.385",
  )
  m = r["model"]
  assert m["params"]["total"] == 6_738_415_616  # LLaMA-7B as published
  assert m["seq_len"] == 2048 and m["tokens"] == 1e12
  assert m["total_flops"] == pytest.approx(m["flops_per_token"] * 1e12)
  assert r["device_hours"] == pytest.approx(m["total_flops"] / (0.5 * 312e12) / 3600)
  assert r["hours"] == pytest.approx(r["device_hours"] / 2048)
  # Same order as the paper's 82,432 GPU-hours (the paper's MFU was not 0.5 exactly).
  assert 50_000 < r["device_hours"] < 120_000
  assert flops_per_token  # the path goes through core.model.flops


@pytest.mark.parametrize(
  "argv, match",
  [
    (["--device", "Cerebras", "--hours", "1"], "unknown device"),
    (["--device", "a100", "--hours", "1", "--region", "atlantis"], "unknown region"),
    (["--device", "a100", "--hours", "-1"], "non-negative"),
    (["--device", "a100", "--hours", "1", "--pue", "0.8"], "PUE"),
    (["--device", "a100", "--hours", "1", "--power_w", "-3"], "positive"),
    (["--device", "a100", "--hours", "1", "--intensity", "385"], "g/kWh"),
    (["--device", "a100", "--count", "0", "--hours", "1"], "count"),
    (["--device", "v5e", "--hours", "1"], "no published power"),
    (["--device", "a100"], "give --hours"),
    (["--device", "a100", "--tokens", "1T", "--mfu", "0.5"], "--gin_file"),
    (["--device", "a100", "--gin_file", "gin/models/llama_7b.gin", "--tokens", "1T"], "--mfu"),
    (
      ["--device", "a100", "--gin_file", "gin/models/nope.gin", "--tokens", "1T", "--mfu", "0.4"],
      "gin file not found",
    ),
  ],
)
def test_bad_input_is_a_clear_error(capsys, argv, match):
  code, out, err = _run(capsys, *argv)
  assert code == 2 and match in err and out == ""


def test_mutually_exclusive_time_and_intensity(capsys):
  with pytest.raises(SystemExit):
    cli.main(["carbon", "--device", "a100", "--hours", "1", "--device_hours", "2"])
  with pytest.raises(SystemExit):
    cli.main(
      ["carbon", "--device", "a100", "--hours", "1", "--intensity", "0.3", "--region", "us-east1"]
    )
