"""Bad gin input fails with an error that names its cause, file and line."""

import subprocess
import sys
from pathlib import Path

import pytest

from core.model.config import ModelConfig
from launch import gin_config

REPO = Path(__file__).resolve().parent.parent
HEADER = "from __gin__ import dynamic_registration\nfrom core.model import config\n"


def write(tmp_path, name, body):
  path = tmp_path / name
  path.write_text(HEADER + body)
  return path


def test_unknown_configurable_names_file_and_line(tmp_path):
  path = write(tmp_path, "bad.gin", "\nconfig.ModelConfg.embed_dim = 8\n")
  with pytest.raises(gin_config.GinConfigError) as e:
    gin_config.parse([path])
  assert "ModelConfg" in str(e.value) and f'"{path}", line 4' in str(e.value)


def test_misspelt_parameter_names_file_and_line(tmp_path):
  path = write(tmp_path, "bad.gin", "config.ModelConfig.embd_dim = 8\n")
  with pytest.raises(gin_config.GinConfigError) as e:
    gin_config.parse([path])
  assert "embd_dim" in str(e.value) and f'"{path}", line 3' in str(e.value)


def test_misspelt_binding_on_the_command_line():
  with pytest.raises(gin_config.GinConfigError, match="num_layer"):
    gin_config.parse(["gin/models/tiny_llama.gin"], ["ModelConfig.num_layer = 3"])


def test_missing_file_suggests_close_names():
  with pytest.raises(gin_config.GinConfigError, match="gin/models/gemma_7b.gin"):
    gin_config.parse(["gin/models/gemma7b.gin"])


def test_missing_include_names_the_including_file(tmp_path):
  path = tmp_path / "inc.gin"
  path.write_text("include 'gin/models/nope.gin'\n")
  with pytest.raises(gin_config.GinConfigError) as e:
    gin_config.parse([path])
  assert "nope.gin" in str(e.value) and f'"{path}", line 1' in str(e.value)


def test_missing_required_value_names_parameter_and_files():
  files = ["gin/models/base/llama.gin"]
  gin_config.parse(files)
  with pytest.raises(gin_config.GinConfigError) as e:
    gin_config.build(ModelConfig, files)
  assert "vocab_size" in str(e.value) and "gin/models/base/llama.gin" in str(e.value)


def test_cli_reports_bad_gin_without_traceback():
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.cli",
      "params",
      "--gin_file",
      "gin/models/tiny_llama.gin",
      "--gin_param",
      "ModelConfig.embd_dim = 3",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 2
  assert "embd_dim" in out.stderr and "Traceback" not in out.stderr
