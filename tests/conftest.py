"""Test set-up: 8 fake CPU devices, a clean gin config and a private MLflow store per test.

The XLA flag must be set before jax is imported anywhere, hence at the top of
this file, which pytest imports before any test module.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Never reach a hub or a dataset mirror from a test.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import gin  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config(clear_constants=True)
  yield
  gin.clear_config(clear_constants=True)


@pytest.fixture(autouse=True)
def _mlflow_store(tmp_path, monkeypatch):
  """Each test logs to its own sqlite store, never to a shared or remote one."""
  uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
  monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
  yield uri
