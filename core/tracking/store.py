"""Talking to an MLflow store: limits, key and value clean-up, error classes, locks."""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any

from core.errors import UserError

# MLflow limits (mlflow/utils/validation.py, MLflow 3.x).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
_TRUNCATED = "...[truncated]"
_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")


class TrackingStoreError(UserError, RuntimeError):
  """The tracking store cannot be reached or written; raised before training starts."""


def clean_key(key: str) -> str:
  """An MLflow-valid key: alphanumerics, _ - . space : / only, at most 250 chars."""
  return _BAD_KEY_CHARS.sub("_", str(key))[:MAX_KEY]


def truncate(value: Any, limit: int) -> str:
  text = str(value)
  return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def is_transient(error: BaseException) -> bool:
  """Worth retrying later: unreachable, timed out, locked, 5xx or 429.

  A 4xx from the store (bad value, changed param, deleted run) will fail the
  same way forever, so it is not retried.
  """
  from mlflow.exceptions import MlflowException

  if isinstance(error, MlflowException):
    status = error.get_http_status_code()
    return not (400 <= status < 500 and status != 429)
  return True


def bound_http_retries(tracking_uri: str, timeout_s: int, max_retries: int) -> None:
  if not tracking_uri.startswith(("http://", "https://")):
    return
  # setdefault: a user's explicit setting wins. These are read per request.
  os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
  os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
  os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


@contextlib.contextmanager
def sqlite_init_lock(tracking_uri: str):
  """Serializes opening a sqlite store across processes.

  MLflow creates and migrates a new sqlite store's schema on first use; two
  processes doing it at once corrupt the migration ('duplicate column name',
  'Online migration expected to match one row'), which no retry repairs. A
  sweep starts many runs on one fresh store, so they take turns here; the
  lock is held only while the run is opened.
  """
  if not tracking_uri.startswith("sqlite:///"):
    yield
    return
  import fcntl

  db = Path(tracking_uri[len("sqlite:///") :].split("?")[0])
  try:
    f = open(db.with_name(db.name + ".lock"), "a")
  except OSError:  # the store's folder is unusable; opening the run says so
    yield
    return
  with f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


# -- the one default store -------------------------------------------------------------
# train, sweep, compare, reproduce, eval and plan all resolve the store here.

DEFAULT_STORE = Path("runs") / "mlflow.db"
# MLflow 3.x's UI opens an experiment on its GenAI (traces) overview unless it is
# tagged as model development (the UI's ExperimentKind values).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def public_uri(tracking_uri: str | None) -> str | None:
  """The URI as files, command lines and logs may show it: no credentials.

  http(s) loses its whole userinfo (MLflow reads the credentials from
  MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD); a database URI keeps its
  user and loses its password (libpq reads it from PGPASSWORD or a pgpass file).
  """
  if not tracking_uri or "@" not in tracking_uri:
    return tracking_uri
  parts = urllib.parse.urlsplit(tracking_uri)
  if not parts.netloc or "@" not in parts.netloc:
    return tracking_uri
  userinfo, host = parts.netloc.rsplit("@", 1)
  user = userinfo.split(":", 1)[0]
  keep = "" if parts.scheme in ("http", "https") or not user else user + "@"
  return urllib.parse.urlunsplit(parts._replace(netloc=keep + host))


def adopt_credentials(tracking_uri: str) -> str:
  """`public_uri(tracking_uri)`, its credentials moved into this process's environment.

  What the URI carried then reaches MLflow (and the processes this one starts)
  through the variables MLflow and libpq read, never through a file or argv.
  """
  public = public_uri(tracking_uri)
  if public == tracking_uri:
    return tracking_uri
  parts = urllib.parse.urlsplit(tracking_uri)
  user = urllib.parse.unquote(parts.username or "")
  password = urllib.parse.unquote(parts.password or "")
  if parts.scheme in ("http", "https"):
    if user:
      os.environ["MLFLOW_TRACKING_USERNAME"] = user
    if password:
      os.environ["MLFLOW_TRACKING_PASSWORD"] = password
  elif parts.scheme.startswith("postgresql") and password:
    os.environ["PGPASSWORD"] = password
  else:
    return tracking_uri  # no variable would carry it: the store needs the URI as given
  return public


def default_tracking_uri() -> str:
  """$MLFLOW_TRACKING_URI, else sqlite:///<cwd>/runs/mlflow.db (its folder created)."""
  uri = os.environ.get("MLFLOW_TRACKING_URI")
  if uri:
    return uri
  path = DEFAULT_STORE.resolve()
  path.parent.mkdir(parents=True, exist_ok=True)
  return f"sqlite:///{path}"


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
  """Artifacts next to a sqlite store (MLflow would use ./mlruns of whatever the cwd is)."""
  if tracking_uri.startswith("sqlite:///"):
    db = Path(tracking_uri[len("sqlite:///") :])
    return f"{(db.parent / 'mlartifacts').resolve().as_uri()}/{experiment}"
  return None  # a server decides where its artifacts go


def ensure_experiment(client: Any, tracking_uri: str, name: str) -> str:
  """The id of experiment `name`, created (artifacts beside the store, tagged) if missing."""
  from mlflow.exceptions import MlflowException

  experiment = client.get_experiment_by_name(name)
  if experiment is None:
    try:
      return client.create_experiment(
        name, artifact_location=artifact_location(tracking_uri, name), tags=dict(EXPERIMENT_TAGS)
      )
    except MlflowException as e:  # created meanwhile by another process
      experiment = client.get_experiment_by_name(name)
      if experiment is None:
        raise TrackingStoreError(f"cannot create experiment {name!r} in {tracking_uri}: {e}") from e
  if experiment.lifecycle_stage != "active":
    raise TrackingStoreError(
      f"MLflow experiment {name!r} is deleted; restore it or choose another name"
    )
  for key, value in EXPERIMENT_TAGS.items():
    if experiment.tags.get(key) != value:
      client.set_experiment_tag(experiment.experiment_id, key, value)
  return experiment.experiment_id
