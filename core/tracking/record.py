"""What a run record holds besides metrics: code version, environment, config identity.

Each function returns plain dicts of strings and numbers, ready for MLflow tags,
params or a JSON artifact. None of them fails because something is missing
(no git, no accelerator, a package not installed): the record says so instead.
"""

from __future__ import annotations

import hashlib
import json
import importlib.metadata
import os
import platform
import re
import socket
import subprocess
import sys
from typing import Any, Mapping

from core.tracking import schema

# Packages whose versions decide what a run computed.
PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "gin-config",
  "mlflow",
  "orbax-checkpoint",
  "grain",
  "tensorflow-datasets",
  "sentencepiece",
  "numpy",
)

_GIT_TIMEOUT_S = 30


def _git(repo_dir: str | os.PathLike, *args: str) -> str:
  return subprocess.run(
    ["git", "-C", str(repo_dir), *args],
    capture_output=True,
    text=True,
    check=True,
    timeout=_GIT_TIMEOUT_S,
  ).stdout


def code_version(repo_dir: str | os.PathLike) -> dict[str, Any]:
  """{'commit', 'dirty', 'diff', 'untracked', 'branch'} of a git checkout.

  `dirty` counts tracked changes and untracked files (MLflow records neither);
  `diff` is `git diff HEAD` (staged and unstaged) when dirty, else ''. Outside
  a checkout, or without git, every field is None and 'error' says why.
  """
  try:
    commit = _git(repo_dir, "rev-parse", "HEAD").strip()
  except (OSError, subprocess.SubprocessError) as e:
    reason = getattr(e, "stderr", None) or str(e)
    return {
      "commit": None,
      "dirty": None,
      "diff": None,
      "untracked": None,
      "branch": None,
      "error": f"no git version for {repo_dir}: {reason.strip()[:500]}",
    }
  status = _git(repo_dir, "status", "--porcelain", "--untracked-files=all")
  untracked = [line[3:] for line in status.splitlines() if line.startswith("??")]
  dirty = bool(status.strip())
  diff = _git(repo_dir, "diff", "HEAD", "--no-color") if dirty else ""
  try:
    branch = _git(repo_dir, "rev-parse", "--abbrev-ref", "HEAD").strip()
  except subprocess.SubprocessError:
    branch = None
  return {"commit": commit, "dirty": dirty, "diff": diff, "untracked": untracked, "branch": branch}


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
  versions = {}
  for name in packages:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def environment(mesh_shape: Mapping[str, int] | None = None) -> dict[str, Any]:
  """Python, platform, package versions, devices and processes of this run."""
  env: dict[str, Any] = {
    "python": sys.version.split()[0],
    "platform": platform.platform(),
    "machine": platform.machine(),
    "hostname": socket.gethostname(),
    "cpu": cpu_model(),
    "cpu_count": os.cpu_count(),
    "packages": package_versions(),
    "mesh": dict(mesh_shape) if mesh_shape is not None else None,
  }
  try:
    import jax

    devices = jax.devices()
    env.update(
      backend=jax.default_backend(),
      device_kind=devices[0].device_kind if devices else None,
      device_count=jax.device_count(),
      local_device_count=jax.local_device_count(),
      process_count=jax.process_count(),
      process_index=jax.process_index(),
    )
  except Exception as e:  # noqa: BLE001  a record without devices beats no record
    env.update(
      backend=None,
      device_kind=None,
      device_count=None,
      local_device_count=None,
      process_count=None,
      process_index=None,
      device_error=str(e)[:500],
    )
  return env


def cpu_model() -> str | None:
  """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or None


def config_hash(operative_config_text: str) -> str:
  """sha256 of a gin config's bindings, ignoring comments, blank lines and trailing spaces.

  Two runs with the same hash computed with the same bindings, whatever the
  comments or the layout of the files that produced them.
  """
  lines = []
  for line in operative_config_text.splitlines():
    line = line.rstrip()
    if not line or line.lstrip().startswith("#"):
      continue
    lines.append(line)
  return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def flatten_params(tree: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, str]:
  """Nested mappings -> {'a.b.c': 'value'} with readable string values.

  For gin text use `launch.gin_config.flatten_config_str`, which keeps gin's
  own `Configurable.param` names.
  """
  flat: dict[str, str] = {}
  for key, value in tree.items():
    name = f"{prefix}{sep}{key}" if prefix else str(key)
    if isinstance(value, Mapping) and value:
      flat.update(flatten_params(value, name, sep))
    else:
      flat[name] = value if isinstance(value, str) else repr(value)
  return flat


_NOT_KEY = re.compile(r"[^\w.\-]+")


def short_axis_names(axes: Mapping[str, Any]) -> dict[str, str]:
  """Swept axes under short names: 'ModelConfig.num_kv_heads' -> 'num_kv_heads'.

  The last dotted component is kept; where two axes would collide, enough
  trailing components are kept to tell them apart.
  """
  split = {key: str(key).replace("/", ".").split(".") for key in axes}
  out: dict[str, str] = {}
  for key, parts in split.items():
    for n in range(1, len(parts) + 1):
      if sum(1 for other in split.values() if other[-n:] == parts[-n:]) == 1:
        break
    short = _NOT_KEY.sub("_", ".".join(parts[-n:])).strip("_") or str(key)
    value = axes[key]
    out[short] = value if isinstance(value, str) else repr(value)
  return out


def run_tags(
  code: Mapping[str, Any],
  env: Mapping[str, Any],
  config_sha: str | None,
  ablax_version: str | None = None,
) -> dict[str, str]:
  """Tags of the run record: code version, config hash, ablax and package versions, devices."""
  if ablax_version is None:
    try:
      ablax_version = importlib.metadata.version("ablax")
    except importlib.metadata.PackageNotFoundError:
      ablax_version = "unknown"
  tags = {
    schema.GIT_COMMIT: str(code.get("commit")),
    schema.GIT_DIRTY: str(code.get("dirty")).lower(),
    schema.VERSION: ablax_version,
    schema.CONFIG_HASH: str(config_sha),
    schema.DEVICE_KIND: str(env.get("device_kind")),
    schema.DEVICE_COUNT: str(env.get("device_count")),
    schema.PROCESS_COUNT: str(env.get("process_count")),
    schema.PYTHON: str(env.get("python")),
  }
  if code.get("commit"):
    tags[schema.MLFLOW_GIT_COMMIT] = code["commit"]  # shown by the MLflow UI
  if env.get("mesh"):
    tags[schema.MESH_TAG] = ",".join(f"{k}={v}" for k, v in env["mesh"].items())
  for name, version in (env.get("packages") or {}).items():
    tags[f"{schema.PACKAGE}{name}"] = str(version)
  return tags


def dataset_inputs(manifest: Mapping[str, Any]) -> list[dict[str, str]]:
  """One MLflow dataset input per source of a data manifest, its digest from the fingerprint.

  The digest is the first 32 hex digits of the sha256 of what identifies the
  source: its content fingerprint with its kind and domain (the embedded
  corpus's two domains share one fingerprint, the files they come from), so two
  runs that read the same data have the same digest whatever their names for it,
  and different data never share one.
  """
  out = []
  for name, source in sorted((manifest.get("sources") or {}).items()):
    if not isinstance(source, Mapping):
      continue
    identity = (
      {k: source.get(k) for k in ("fingerprint", "kind", "domain", "spec", "feature")}
      if "fingerprint" in source
      else source
    )
    text = json.dumps(identity, sort_keys=True, default=str)
    out.append(
      {
        "name": str(name),
        "digest": hashlib.sha256(text.encode()).hexdigest()[:32],
        "source": str(source.get("kind") or name),
        "context": "train",
      }
    )
  return out


def write_run_record(
  tracker: Any,
  *,
  repo_dir: str | os.PathLike | None = None,
  operative_config: str | None = None,
  bound_config: str | None = None,
  gin_files: tuple[str | os.PathLike, ...] | list = (),
  flat_params: Mapping[str, Any] | None = None,
  swept_axes: Mapping[str, Any] | None = None,
  mesh_shape: Mapping[str, int] | None = None,
  param_counts: Mapping[str, int] | None = None,
  dataset_manifest: Mapping[str, Any] | str | os.PathLike | None = None,
  config_sha: str | None = None,
) -> dict[str, str]:
  """Logs a run's whole record through `tracker` (a RunTracker or NullTracker); returns the tags.

  Params: `flat_params` (e.g. `launch.gin_config.binding_params(bindings)`)
  and the swept axes under short names. Artifacts: config/config.gin,
  config/operative_config.gin (full text, as params truncate at 6000 chars),
  config/gin_files/*, environment.json, code/version.json (+ code/diff.patch
  when dirty), model/param_counts.json, data/manifest.json. Tags: run_tags().
  `config_sha` is the config hash (launch.gin_config.bindings_hash of gin's
  bindings); without it, the hash of the operative config's text.
  """
  code = code_version(repo_dir) if repo_dir is not None else {"commit": None, "dirty": None}
  env = environment(mesh_shape)
  sha = config_sha or (config_hash(operative_config) if operative_config is not None else None)
  tags = run_tags(code, env, sha)
  if swept_axes:
    tags[schema.SWEPT] = ",".join(short_axis_names(swept_axes))
  tracker.set_tags(tags)
  params = dict(flat_params or {})
  if swept_axes:
    params.update(short_axis_names(swept_axes))
  if params:
    tracker.log_params(params)
  if bound_config is not None:
    tracker.log_text(bound_config, schema.CONFIG_ARTIFACT)
  if operative_config is not None:
    tracker.log_text(operative_config, schema.OPERATIVE_CONFIG_ARTIFACT)
  for path in gin_files:
    tracker.log_artifact(path, schema.GIN_FILES_ARTIFACTS)
  tracker.log_dict(env, schema.ENVIRONMENT_ARTIFACT)
  tracker.log_dict({k: v for k, v in code.items() if k != "diff"}, schema.CODE_VERSION_ARTIFACT)
  if code.get("diff"):
    tracker.log_text(code["diff"], schema.CODE_DIFF_ARTIFACT)
  if param_counts is not None:
    tracker.log_dict(dict(param_counts), schema.PARAM_COUNTS_ARTIFACT)
  if isinstance(dataset_manifest, Mapping):
    tracker.log_dict(dict(dataset_manifest), schema.DATA_MANIFEST_ARTIFACT)
    datasets = dataset_inputs(dataset_manifest)
    if datasets:
      tracker.log_inputs(datasets)
  elif dataset_manifest is not None:
    tracker.log_artifact(dataset_manifest, schema.DATA_MANIFEST_ARTIFACT.split("/")[0])
  return tags
