"""Loading gin files and bindings, with errors that name their cause.

`core/` never imports gin; this module is where gin meets the library. Gin files
register components with dynamic registration (`from __gin__ import
dynamic_registration`, `import core.model.config`) and bind names such as
`ModelConfig.embed_dim`. Relative gin paths resolve against the working
directory first, then `--gin_search_paths`, then the ablax checkout, so
`gin/models/gemma_7b.gin` works from anywhere.

The flags are t5x's: `--gin_file` (repeatable), `--gin_bindings` (alias
`--gin_param`, repeatable), `--gin_search_paths`, and the shorthand
`--gin.NAME=VALUE`, rewritten to the binding `NAME = VALUE` before parsing
(`rewrite_shorthand`), so `--gin.NUM_STEPS=50` sets the macro of
gin/train/base.gin.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import importlib.util  # noqa: F401  gin 0.5.0 needs it loaded to report a missing file.
import inspect
import logging
import os
import tokenize
from pathlib import Path
from typing import Any, Sequence

import gin

from core.errors import UserError
from core.paths import REPO_ROOT

# Extra folders for gin files and includes; in the environment so that the
# processes a command starts (sweep points, workers) search the same folders.
SEARCH_PATHS_ENV = "ABLAX_GIN_SEARCH_PATHS"


class GinConfigError(UserError, ValueError):
  """A gin file or binding that cannot be used; the message names the cause."""


# -- command-line flags ------------------------------------------------------------------


def add_arguments(parser, required: bool = False, files_help: str = "gin file") -> None:
  """The gin flags every command that reads gin files takes (t5x's names)."""
  parser.add_argument(
    "--gin_file",
    action="append",
    default=[],
    required=required,
    help=f"{files_help} (repeatable; later files win)",
  )
  parser.add_argument(
    "--gin_bindings",
    "--gin_param",
    dest="gin_param",
    action="append",
    default=[],
    metavar="BINDING",
    help="a gin binding such as 'core.train.loop.train.num_steps = 50' "
    "(repeatable, applied after the files; --gin.NAME=VALUE is shorthand)",
  )
  parser.add_argument(
    "--gin_search_paths",
    action="append",
    default=[],
    metavar="DIRS",
    help="folders (comma-separated, repeatable) searched for gin files and "
    "includes after the working directory and before the ablax checkout",
  )


def rewrite_shorthand(argv: Sequence[str]) -> list[str]:
  """t5x's `--gin.NAME=VALUE` -> `--gin_bindings 'NAME = VALUE'`; other arguments unchanged."""
  out: list[str] = []
  for arg in argv:
    if arg.startswith("--gin.") and not arg.startswith("--gin.-"):
      name, eq, value = arg[len("--gin.") :].partition("=")
      if not eq or not name:
        raise GinConfigError(f"{arg}: the shorthand is --gin.NAME=VALUE, e.g. --gin.NUM_STEPS=50")
      out += ["--gin_bindings", f"{name} = {value}"]
    else:
      out.append(arg)
  return out


def add_search_paths(paths: Sequence[str]) -> None:
  """Adds --gin_search_paths values (each may hold several, comma-separated)."""
  folders = [p for entry in paths for p in entry.split(",") if p]
  for folder in folders:
    if not Path(folder).is_dir():
      raise GinConfigError(f"--gin_search_paths: {folder} is not a folder")
  known = search_paths()
  new = [str(Path(f).resolve()) for f in folders if str(Path(f).resolve()) not in known]
  if new:
    os.environ[SEARCH_PATHS_ENV] = os.pathsep.join([*known, *new])


def search_paths() -> list[str]:
  return [p for p in os.environ.get(SEARCH_PATHS_ENV, "").split(os.pathsep) if p]


def parse_args(args, finalize: bool = True) -> list[Path]:
  """parse() with a command's gin flags (add_arguments)."""
  add_search_paths(getattr(args, "gin_search_paths", []) or [])
  return parse(args.gin_file, args.gin_param, finalize=finalize)


def all_gin_files(root: Path = REPO_ROOT) -> list[Path]:
  return sorted(p for d in ("gin", "ablations") for p in (root / d).rglob("*.gin"))


def resolve_gin_file(path: str | os.PathLike) -> Path:
  """The gin file at `path` (as given, in a search path or in the checkout), or a clear error."""
  folders = [*search_paths(), str(REPO_ROOT)]
  candidates = [Path(path), *(Path(f) / path for f in folders)]
  for candidate in candidates:
    if candidate.is_file():
      return candidate.resolve()
  known = [str(p.relative_to(REPO_ROOT)) for p in all_gin_files()]
  close = difflib.get_close_matches(str(path), known, n=3, cutoff=0.5)
  hint = f"; did you mean {', '.join(close)}?" if close else ""
  raise GinConfigError(
    f"gin file not found: {path} (looked in {Path.cwd()}, {', '.join(folders)}){hint}"
  )


class _QuietIncludeProbe(logging.Filter):
  """Drops gin's 'Path not found' lines: it logs one for every search folder an include is
  not in (as a Python package path) before finding it in the next, so a run started outside
  the checkout printed an ERROR per include although nothing was wrong."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (
      record.pathname.endswith("resource_reader.py")
      and str(record.msg).startswith("Path not found")
    )


def parse(
  gin_files: Sequence[str | os.PathLike] = (), gin_params: Sequence[str] = (), finalize: bool = True
) -> list[Path]:
  """Parses files (later ones win) then bindings; returns the resolved file paths."""
  resolved = [resolve_gin_file(f) for f in gin_files]
  for folder in (*search_paths(), str(REPO_ROOT)):
    if folder not in gin.config._LOCATION_PREFIXES:  # noqa: SLF001  (gin appends duplicates)
      gin.add_config_file_search_path(folder)
  quiet = _QuietIncludeProbe()
  root = logging.getLogger()
  root.addFilter(quiet)
  where = "the gin files"
  try:
    for f in resolved:
      where = str(f)
      gin.parse_config_file(str(f))
    if gin_params:
      where = "the --gin_param bindings"
      gin.parse_config(list(gin_params))
    if finalize:
      _check_macros()  # before finalizing, whose hooks would report it as a page of config
      # Finalizing is where a `%gin.REQUIRED` that nothing overrode is reported.
      where = "the gin files and bindings"
      gin.finalize()
  except tokenize.TokenError as e:
    # Python's tokenizer ran to the end of the text inside a bracket or a string.
    what = e.args[0] if e.args else str(e)
    raise GinConfigError(f"{what} in {where}: a bracket or a string is left open") from None
  except (ValueError, OSError, SyntaxError, ImportError, TypeError, NameError, AttributeError) as e:
    message = str(e)
    if "Unable to open file" in message:
      message = message.replace("Unable to open file", "gin include not found")
    raise GinConfigError(message) from None
  finally:
    root.removeFilter(quiet)
  return resolved


def _check_macros() -> None:
  """A binding to a macro nothing sets (`num_steps = %NUM_STEPS`) is an error now, naming it.

  Gin would only say so when the configurable is called, in a message that
  prints the whole config; a direct binding of the parameter overrides the
  macro reference, and then the macro is not needed.
  """
  for (scope, selector), params in gin.config._CONFIG.items():  # noqa: SLF001
    if selector == _MACRO:
      continue
    for name, value in params.items():
      if (
        isinstance(value, gin.config.ConfigurableReference)
        and value.selector == _MACRO
        and "value" not in gin.config._CONFIG.get((_macro_name(value), _MACRO), {})
      ):  # noqa: SLF001
        macro = _macro_name(value)
        where = f"{scope}/{selector}" if scope else selector
        raise GinConfigError(
          f"{where}.{name} = %{macro}, and nothing sets {macro}: bind it, "
          f"e.g. --gin.{macro}=... or --gin_bindings '{macro} = ...'"
        )


def _macro_name(reference) -> str:
  return reference.scoped_selector[: -len("/" + _MACRO)]


def build(
  cls_or_fn: Any, gin_files_hint: Sequence[str | os.PathLike] = (), **overrides: Any
) -> Any:
  """Calls the gin-configured `cls_or_fn`, turning missing values into a clear error."""
  configurable = gin.get_configurable(cls_or_fn)
  try:
    return configurable(**overrides)
  except TypeError as e:
    missing = _missing_required(cls_or_fn, overrides)
    if not missing:
      raise
    files = ", ".join(str(f) for f in gin_files_hint) or "(no gin files)"
    raise GinConfigError(
      f"{cls_or_fn.__name__} is missing required values {missing}: none of the gin files "
      f"[{files}] or --gin_param bindings set them, e.g. "
      f"--gin_param '{cls_or_fn.__name__}.{missing[0]} = ...'"
    ) from e


def _missing_required(cls_or_fn: Any, overrides: dict[str, Any]) -> list[str]:
  bound = dict(gin.get_bindings(cls_or_fn)) if _has_bindings(cls_or_fn) else {}
  if dataclasses.is_dataclass(cls_or_fn):
    required = [
      f.name
      for f in dataclasses.fields(cls_or_fn)
      if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
  else:
    required = [
      n
      for n, p in inspect.signature(cls_or_fn).parameters.items()
      if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
  return [n for n in required if n not in bound and n not in overrides]


def _has_bindings(cls_or_fn: Any) -> bool:
  try:
    gin.get_bindings(cls_or_fn)
    return True
  except (ValueError, KeyError):
    return False


def write_configs(out_dir: str | os.PathLike) -> dict[str, Path]:
  """Writes the bound and the operative config; call after the run built its objects."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"config": out / "config.gin", "operative_config": out / "operative_config.gin"}
  paths["config"].write_text(gin.config_str())
  paths["operative_config"].write_text(gin.operative_config_str())
  return paths


# -- the run record's view of the config ---------------------------------------------------
# Keys and the hash come from gin's own (scope, selector) -> {parameter: value} tables,
# never from its printed text: under dynamic registration the text names modules by
# numbered aliases (`core4.llama_adamw`) that renumber when an unrelated import is added.

MODEL_SELECTOR = "core.model.config.ModelConfig"


def operative_bindings() -> dict[str, Any]:
  """{'core.train.optimizer.llama_adamw.peak_lr': 0.003, ...}: every value the run used.

  Keys are `[scope/]module.path.Configurable.parameter`; values are those gin
  passed (bound, or the default the function declares), as plain data: strings
  without quotes, references as '@selector' ('@selector()' when called), and
  paths inside the checkout relative to it, so a moved checkout changes nothing.
  """
  out: dict[str, Any] = {}
  for (scope, selector), params in gin.config._OPERATIVE_CONFIG.items():  # noqa: SLF001
    if selector == _MACRO:
      continue  # its value is logged where it is used (_plain)
    prefix = f"{scope}/{selector}" if scope else selector
    for name, value in params.items():
      out[f"{prefix}.{name}"] = _plain(value)
  return dict(sorted(out.items()))


_MACRO = "gin.macro"


def resolve_macro(value: Any) -> Any:
  """A bound value with macros replaced by theirs (gin.get_bindings keeps `%NUM_STEPS`)."""
  while isinstance(value, gin.config.ConfigurableReference) and value.selector == _MACRO:
    try:
      value = gin.query_parameter("%" + _macro_name(value))
    except ValueError:
      raise GinConfigError(f"nothing sets the macro {_macro_name(value)}") from None
  return value


def _plain(value: Any) -> Any:
  if isinstance(value, gin.config.ConfigurableReference):
    if value.selector == _MACRO:
      # A macro stands for its value: `train.num_steps` keeps its key whether a file binds it
      # directly or through %NUM_STEPS, and the hash follows the value, not the spelling.
      return _plain(resolve_macro(value))
    return f"@{value.selector}" + ("()" if value.evaluate else "")
  if isinstance(value, (os.PathLike, str)):
    text = os.fspath(value)
    root = str(REPO_ROOT) + os.sep
    return text[len(root) :] if text.startswith(root) else text
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if value is None or isinstance(value, (bool, int, float)):
    return value
  return repr(value)


def binding_params(bindings: dict[str, Any]) -> dict[str, str]:
  """MLflow params of the bindings; ModelConfig's are left out (the trainer logs `model.*`)."""
  return {
    key: value if isinstance(value, str) else json.dumps(value)
    for key, value in bindings.items()
    if not key.startswith(MODEL_SELECTOR + ".")
  }


def bindings_hash(bindings: dict[str, Any]) -> str:
  """sha256 of the bindings: equal for equal values, whatever files, order, comments or paths."""
  text = json.dumps(bindings, sort_keys=True, separators=(",", ":"), default=repr)
  return hashlib.sha256(text.encode()).hexdigest()
