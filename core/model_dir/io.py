"""The ablax model format: a trained or imported model that inference code loads.

A model directory holds

  params/            the nnx.Param leaves as a nested dict of arrays (orbax)
  model.gin          gin bindings that rebuild the same ModelConfig
  tokenizer.model    the SentencePiece model, when one was given
  ablax_model.json   format version, the config, parameter counts, source,
                     sha256 of the tokenizer; written last, so its presence
                     marks a complete directory

`ablax_model.json` is what `load_model` reads the config from; `model.gin` is
for people and for gin-driven tools (`--gin_file OUT/model.gin`). Parameters are
named by their path in the module tree, joined with '/', e.g.
'blocks/0/attn/q'; `flat_params`/`model_from_params` convert between a model and
that flat form, which the Hugging Face importer also produces. The flat form is
always per layer: a model with `scan_layers` (weights stacked over the repeats
of the attention pattern) is unstacked on the way out and stacked on the way
in, so files never depend on how the layers run.

core/ imports no gin, so model.gin is generated as plain text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from flax import nnx

from core.errors import UserError
from core.model.config import ConfigError, ModelConfig
from core.model.flops import abstract_model, param_counts
from core.model.transformer import Transformer

# A stored tokenizer is identified the way core.tokenizer identifies it: by its file's hash.
from core.tokenizer.spm import file_sha256

FORMAT_NAME = "ablax-model"
FORMAT_VERSION = 1
MANIFEST = "ablax_model.json"
PARAMS_DIR = "params"
GIN_FILE = "model.gin"
TOKENIZER_FILE = "tokenizer.model"


class ModelIOError(UserError, ValueError):
  """A model directory or parameter tree that cannot be read or written as asked."""


# -- parameters as a flat {name: array} dict ----------------------------------


def _path_name(path) -> str:
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value":
      continue  # the Variable's own field, not part of the module path
    parts.append(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))))
  return "/".join(parts)


def flat_params(model: nnx.Module) -> dict[str, Any]:
  """{'blocks/0/attn/q': array, ...} of every nnx.Param of `model`, one entry per layer."""
  state = nnx.state(model, nnx.Param)
  flat = {_path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(state)}
  config = getattr(model, "config", None)
  return unstack_layers(flat, config) if config is not None and config.scan_layers else flat


def _layer_name(name: str) -> tuple[int, str] | None:
  parts = name.split("/", 2)
  if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
    return int(parts[1]), parts[2]
  return None


def unstack_layers(flat: Mapping[str, Any], config: ModelConfig) -> dict[str, Any]:
  """Scanned names ('blocks/p/...', leading repeats axis) -> per-layer names ('blocks/i/...')."""
  size, repeats = len(config.layer_period[0]), config.layer_period[1]
  out = {}
  for name, value in flat.items():
    layer = _layer_name(name)
    if layer is None:
      out[name] = value
      continue
    p, rest = layer
    for r in range(repeats):
      out[f"blocks/{r * size + p}/{rest}"] = value[r]
  return out


def stack_layers(flat: Mapping[str, Any], config: ModelConfig) -> dict[str, Any]:
  """Per-layer names -> scanned names, each position of the period stacked over the repeats."""
  size, repeats = len(config.layer_period[0]), config.layer_period[1]
  out, groups = {}, {}
  for name, value in flat.items():
    layer = _layer_name(name)
    if layer is None:
      out[name] = value
    else:
      groups.setdefault((layer[0] % size, layer[1]), {})[layer[0] // size] = value
  for (p, rest), by_repeat in groups.items():
    out[f"blocks/{p}/{rest}"] = np.stack([np.asarray(by_repeat[r]) for r in range(repeats)])
  return out


def expected_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Name -> (shape, dtype) of every parameter (per layer) of `config`; allocates nothing."""
  return {
    name: (tuple(leaf.shape), np.dtype(leaf.dtype))
    for name, leaf in flat_params(abstract_model(config.replace(scan_layers=False))).items()
  }


def check_params(
  config: ModelConfig, shapes: Mapping[str, tuple[int, ...]], where: str = "parameters"
) -> None:
  """Raises ModelIOError naming every missing, unexpected or mis-shaped leaf."""
  want = expected_shapes(config)
  missing = sorted(set(want) - set(shapes))
  unexpected = sorted(set(shapes) - set(want))
  wrong = sorted(
    f"{n}: got {tuple(shapes[n])}, config needs {want[n][0]}"
    for n in set(want) & set(shapes)
    if tuple(shapes[n]) != want[n][0]
  )
  if not (missing or unexpected or wrong):
    return
  lines = [f"{where} do not match the model config"]
  if missing:
    lines.append(f"  missing ({len(missing)}): {', '.join(missing)}")
  if unexpected:
    lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected)}")
  if wrong:
    lines.append(f"  wrong shape ({len(wrong)}):")
    lines.extend(f"    {w}" for w in wrong)
  raise ModelIOError("\n".join(lines))


def model_from_params(
  config: ModelConfig, params: Mapping[str, Any], where: str = "parameters"
) -> Transformer:
  """A Transformer of `config` holding `params` (flat names), cast to config.param_dtype.

  The model is built abstractly and filled in, so no random initialization runs
  (a 7B model would otherwise spend minutes drawing weights it then discards).
  """
  check_params(config, {n: np.shape(a) for n, a in params.items()}, where)
  if config.scan_layers:
    params = stack_layers(params, config)
  abstract = abstract_model(config)
  graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
  dtype = jax.numpy.dtype(config.param_dtype)

  def fill(path, leaf):
    value = params[_path_name(path)]
    return jax.numpy.asarray(value, dtype=dtype)

  state = jax.tree_util.tree_map_with_path(fill, state)
  return nnx.merge(graphdef, state, rest)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


# -- model.gin -----------------------------------------------------------------


def config_gin(config: ModelConfig, header: str = "") -> str:
  """Gin text binding every field of `config`; parsing it rebuilds an equal config."""
  lines = [f"# {line}".rstrip() for line in (header or "ablax model config").splitlines()]
  lines += [
    "# Provides: a complete ModelConfig. Requires: nothing.",
    "# Generated by core.model_dir.io; edit the config, not this file.",
    "from __gin__ import dynamic_registration",
    "from core.model import config",
    "",
  ]
  for field in dataclasses.fields(config):
    lines.append(f"config.ModelConfig.{field.name} = {_gin_literal(getattr(config, field.name))}")
  return "\n".join(lines) + "\n"


def _gin_literal(value: Any) -> str:
  # repr of these types is also valid gin; anything else would need a
  # configurable reference, which a ModelConfig field never is.
  if isinstance(value, (bool, int, float, str, type(None))):
    return repr(value)
  if isinstance(value, tuple):
    inner = ", ".join(_gin_literal(v) for v in value)
    return f"({inner},)" if len(value) == 1 else f"({inner})"
  raise ModelIOError(f"cannot write {value!r} ({type(value).__name__}) to gin")


# -- save / load -----------------------------------------------------------------


def save_model(
  out_dir: str | os.PathLike,
  model: nnx.Module,
  config: ModelConfig,
  *,
  tokenizer_path: str | os.PathLike | None = None,
  metadata: Mapping[str, Any] | None = None,
  overwrite: bool = False,
) -> Path:
  """Writes `model` (a Transformer of `config`) as an ablax model directory.

  The directory is assembled next to `out_dir` and renamed into place, so a
  crash never leaves a half-written model that looks complete.

  Multi-process runs gather the parameters first and call this from one
  process (the write involves no other process): every array must be fully
  addressable here.

  Args:
    out_dir: destination; must not exist unless `overwrite`.
    model: the Transformer whose nnx.Param leaves are saved.
    config: its ModelConfig.
    tokenizer_path: a SentencePiece .model file to store with the model.
    metadata: JSON-serializable extras; `metadata['source']` (e.g. 'hf:<dir>',
      'train:<run id>') is lifted into the manifest's `source` field.
    overwrite: replace an existing ablax model directory at `out_dir`.

  Returns:
    The resolved `out_dir`.
  """
  out = Path(out_dir).resolve()
  if out.exists():
    if not overwrite:
      raise ModelIOError(
        f"{out} already exists; choose a new directory or overwrite it "
        "(overwrite=True, --overwrite)"
      )
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
      raise ModelIOError(
        f"{out} exists and is not an ablax model directory; refusing to replace it"
      )
  leaves = flat_params(model)
  scattered = [
    n for n, a in leaves.items() if isinstance(a, jax.Array) and not a.is_fully_addressable
  ]
  if scattered:
    raise ModelIOError(
      f"parameters {scattered[:3]}... are spread over several processes; gather them "
      "(e.g. jax.experimental.multihost_utils.process_allgather) and save from one process"
    )
  params = {n: np.asarray(a) for n, a in leaves.items()}
  check_params(config, {n: a.shape for n, a in params.items()}, "model parameters")
  tok = Path(tokenizer_path) if tokenizer_path is not None else None
  if tok is not None and not tok.is_file():
    raise ModelIOError(f"tokenizer file not found: {tok}")
  meta = dict(metadata or {})
  try:
    json.dumps(meta)
  except TypeError as e:
    raise ModelIOError(f"metadata must be JSON-serializable: {e}") from None

  with staged_directory(out) as staging:
    _save_params(staging / PARAMS_DIR, params)
    (staging / GIN_FILE).write_text(config_gin(config, header=_gin_header(config, meta)))
    tokenizer_sha = None
    if tok is not None:
      shutil.copyfile(tok, staging / TOKENIZER_FILE)
      tokenizer_sha = file_sha256(staging / TOKENIZER_FILE)
    manifest = {
      "format": FORMAT_NAME,
      "format_version": FORMAT_VERSION,
      "config": config.to_dict(),
      "param_counts": param_counts(config),
      "source": meta.pop("source", None),
      "tokenizer": TOKENIZER_FILE if tok is not None else None,
      "tokenizer_sha256": tokenizer_sha,
      "metadata": meta,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
  return out


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
  """A fresh folder beside `out` to write into; it replaces `out` only if the block succeeds.

  A failed or interrupted write leaves `out` as it was and no partial folder behind,
  so a reader never sees half a model directory (or half an exported checkpoint).
  """
  out.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    yield staging
    if out.exists():
      shutil.rmtree(out)
    staging.rename(out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _gin_header(config: ModelConfig, meta: Mapping[str, Any]) -> str:
  counts = param_counts(config)
  source = meta.get("source")
  first = f"ablax model config (source: {source})" if source else "ablax model config"
  return (
    f"{first}\nParameters: embedding {counts['embedding']:,}; "
    f"non-embedding {counts['non_embedding']:,}; total {counts['total']:,}."
  )


def _save_params(path: Path, params: Mapping[str, np.ndarray]) -> None:
  import orbax.checkpoint as ocp  # local: orbax is slow to import and only needed here

  # Host-local numpy arrays, written by the calling process alone: by default orbax
  # synchronizes every process of a multi-process run and would wait for the others forever.
  me = jax.process_index()
  only_me = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  with ocp.StandardCheckpointer(multiprocessing_options=only_me) as ckptr:
    ckptr.save(path, _nest(params))
    ckptr.wait_until_finished()


def read_manifest(model_dir: str | os.PathLike) -> dict[str, Any]:
  """The parsed ablax_model.json of `model_dir`, or a ModelIOError saying what is wrong."""
  root = Path(model_dir)
  if not root.is_dir():
    raise ModelIOError(f"model directory not found: {root}")
  manifest_path = root / MANIFEST
  if not manifest_path.is_file():
    hint = ""
    if (root / "config.json").is_file():
      hint = "; it looks like a Hugging Face checkpoint: convert it with `ablax import-hf`"
    raise ModelIOError(f"{root} is not an ablax model directory (no {MANIFEST}){hint}")
  try:
    manifest = json.loads(manifest_path.read_text())
  except json.JSONDecodeError as e:
    raise ModelIOError(f"{manifest_path}: not valid JSON ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
    raise ModelIOError(f"{manifest_path}: not an {FORMAT_NAME} manifest")
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise ModelIOError(
      f"{manifest_path}: format_version {version!r}; this ablax reads version {FORMAT_VERSION}"
    )
  return manifest


def config_from_dict(values: Mapping[str, Any], where: str = "config") -> ModelConfig:
  """ModelConfig from `to_dict()` output (JSON turns tuples into lists; fixed here)."""
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ModelIOError(f"{where}: unknown ModelConfig fields {unknown} (written by a newer ablax?)")
  try:
    return ModelConfig(**values)
  except (TypeError, ConfigError) as e:
    raise ModelIOError(f"{where}: {e}") from None


def load_model(model_dir: str | os.PathLike) -> tuple[Transformer, ModelConfig, dict[str, Any]]:
  """Restores a directory written by `save_model`.

  Returns:
    (model, config, meta): meta is the manifest, plus 'tokenizer_path' (absolute
    path of the stored tokenizer, or None) and 'model_dir'.
  """
  root = Path(model_dir).resolve()
  manifest = read_manifest(root)
  config = config_from_dict(manifest.get("config") or {}, where=str(root / MANIFEST))
  params_path = root / PARAMS_DIR
  if not params_path.is_dir():
    raise ModelIOError(f"{params_path} is missing: the model directory is incomplete")

  import orbax.checkpoint as ocp  # local: see _save_params

  with ocp.StandardCheckpointer() as ckptr:
    try:
      stored = ckptr.metadata(params_path).item_metadata.tree
    except (FileNotFoundError, ValueError, OSError) as e:
      raise ModelIOError(f"{params_path}: cannot read the stored parameters ({e})") from None
    stored_flat = _flatten(stored)
    check_params(
      config,
      {n: tuple(m.shape) for n, m in stored_flat.items()},
      where=f"parameters in {params_path}",
    )
    target = _nest(
      {n: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)) for n, m in stored_flat.items()}
    )
    restored = _flatten(ckptr.restore(params_path, target))
  model = model_from_params(config, restored, where=f"parameters in {params_path}")

  tokenizer = manifest.get("tokenizer")
  tokenizer_path = None
  if tokenizer:
    tokenizer_path = root / tokenizer
    if not tokenizer_path.is_file():
      raise ModelIOError(f"{tokenizer_path} is missing but {MANIFEST} lists a tokenizer")
    want = manifest.get("tokenizer_sha256")
    if want and file_sha256(tokenizer_path) != want:
      raise ModelIOError(
        f"{tokenizer_path}: sha256 differs from the one in {MANIFEST}; "
        "the tokenizer was replaced after the model was saved"
      )
  meta = dict(
    manifest, tokenizer_path=str(tokenizer_path) if tokenizer_path else None, model_dir=str(root)
  )
  return model, config, meta
