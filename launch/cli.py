"""`ablax` entry point.

Each subcommand lives in its own module `launch/commands/<name>.py` exposing
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only when
their subcommand runs, so `ablax --help` stays fast and a broken optional
dependency of one command never breaks the others. t5x's `--gin.NAME=VALUE`
shorthand is rewritten here, once, for every command. Bad input, whatever
command raises it (core.errors.UserError), is printed here as
`ablax <command>: <cause>` with exit status 2; ABLAX_DEBUG=1 shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Set to 1 to see the traceback of a bad-input error (core.errors.UserError).
DEBUG_ENV = "ABLAX_DEBUG"

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
  "train": ("launch.commands.train", "train a model from gin files"),
  "sweep": ("launch.commands.sweep", "run an ablation sweep (grid x seeds)"),
  "compare": ("launch.commands.compare", "compare the runs of a sweep from MLflow"),
  "reproduce": ("launch.commands.reproduce", "re-run an MLflow run from its recorded config"),
  "params": ("launch.commands.params", "count a model's parameters without allocating it"),
  "plan": (
    "launch.commands.plan",
    "compile the train step for a TPU slice or GPU node: memory, FLOPs, time, energy",
  ),
  "carbon": ("launch.commands.carbon", "project energy and carbon of a training run"),
  "eval": ("launch.commands.eval", "evaluate a model directory"),
  "score": ("launch.commands.score", "per-token log-probabilities of a text under a model"),
  "sample": ("launch.commands.sample", "sample from a model directory"),
  "tokenizer": ("launch.commands.tokenizer", "train or subset SentencePiece tokenizers"),
  "data": ("launch.commands.data", "inspect a data pipeline"),
  "import-hf": ("launch.commands.import_hf", "convert a Hugging Face checkpoint to ablax"),
  "export-hf": ("launch.commands.export_hf", "write an ablax model as a Hugging Face checkpoint"),
  "tracking": (
    "launch.commands.tracking",
    "deliver records a run kept in its workdir while the store was down",
  ),
  "launch": (
    "launch.commands.tpu_vm",
    "start a run on other machines (tpu-vm: every worker of a TPU pod slice)",
  ),
}


DESCRIPTION = """\
ablax: reproduce and extend the architecture ablations of the Gemma and LLaMA papers.
Models are gin-configured Flax NNX components; every run is recorded in MLflow."""

EPILOG = """\
common commands:
  ablax sweep ablations/quickstart.gin                 MHA vs GQA vs MQA, 2 seeds, ~5 min on CPU
  ablax train --gin_file gin/experiments/tiny_llama.gin --gin.NUM_STEPS=50
  ablax compare --sweep quickstart --at flops=1e13     the table, at equal training FLOPs
  ablax params --all                                   the presets' parameter counts
  ablax plan --gin_file gin/plan/gemma2_9b_v5e-256.gin --target v5e-256
  ablax reproduce RUN_ID                               re-run a recorded run, compare curves

gin flags (t5x's): --gin_file F (repeatable), --gin_bindings 'A.b = 1' (alias --gin_param),
--gin.NAME=VALUE (shorthand for a binding, e.g. --gin.NUM_STEPS=50), --gin_search_paths DIRS.
Runs are recorded in $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db (artifacts in
runs/mlartifacts); `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db` opens it.
`ablax COMMAND --help` describes each command."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Keeps descriptions' own line breaks and adds each argument's default to its help,
  unless the help already states it or there is none to state (None, False, [])."""

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ""
    default = action.default
    if (
      "default" in text
      or default in (None, False, [], argparse.SUPPRESS)
      or action.option_strings == []
      and action.nargs in ("?", "*")
      and not default
      or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
    ):  # noqa: SLF001
      return text
    return f"{text} (default: %(default)s)"


def version() -> str:
  """'ablax 0.1.0 (git abc1234, jax 0.10.2)': the package, the checkout's commit and JAX."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  from core.paths import REPO_ROOT  # pylint: disable=g-import-not-at-top

  parts = []
  try:
    commit = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"],
      capture_output=True,
      text=True,
      timeout=5,
      check=True,
      cwd=REPO_ROOT,
    ).stdout.strip()
    parts.append(f"git {commit}")
  except (OSError, subprocess.SubprocessError):
    pass
  for dist in ("jax", "flax"):
    try:
      parts.append(f"{dist} {importlib.metadata.version(dist)}")
    except importlib.metadata.PackageNotFoundError:
      pass
  try:
    own = importlib.metadata.version("ablax")
  except importlib.metadata.PackageNotFoundError:
    own = "(not installed)"
  return f"ablax {own} ({', '.join(parts)})"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="ablax",
    description=DESCRIPTION,
    epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--version", action="store_true", help="print the version and exit")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (_, help_text) in COMMANDS.items():
    sub.add_parser(name, help=help_text, add_help=False)
  return parser


def command_parser(name: str) -> argparse.ArgumentParser:
  """The parser of one subcommand, with its arguments (what `ablax NAME --help` shows)."""
  module_name, help_text = COMMANDS[name]
  module = importlib.import_module(module_name)
  parser = argparse.ArgumentParser(
    prog=f"ablax {name}", description=_description(module, help_text), formatter_class=HelpFormatter
  )
  module.add_arguments(parser)
  _describe_actions(parser)
  return parser


def _describe_actions(parser: argparse.ArgumentParser) -> None:
  """Gives every sub-subcommand (`ablax tokenizer train`) its one-line help as its description
  and this module's help format, so `ablax tokenizer train --help` says what it does."""
  for action in parser._actions:  # noqa: SLF001
    if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
      helps = {a.dest: a.help for a in action._choices_actions}  # noqa: SLF001
      for name, sub in action.choices.items():
        sub.description = sub.description or helps.get(name)
        sub.formatter_class = HelpFormatter
        _describe_actions(sub)


def _description(module, help_text: str) -> str:
  """The command's one-line help, then its module docstring's usage lines, if any."""
  doc = (module.__doc__ or "").strip()
  return f"{help_text}\n\n{doc}" if doc else help_text


def _skip_absent_accelerators() -> None:
  """On a machine without TPU or GPU devices, keep JAX on CPU even where their plugins are.

  The `tpu` and `plan-gpu` extras (and the test extra, for `ablax plan`)
  install libtpu and the CUDA plugin; JAX then probes for their devices at
  start-up, which on any other machine only costs time and prints
  metadata-server errors and a CUDA traceback. TPU VMs expose /dev/accel* or
  /dev/vfio/*, GPU nodes /dev/nvidia*; there nothing changes, and an explicit
  JAX_PLATFORMS always wins.
  """
  import glob  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  if "JAX_PLATFORMS" in os.environ:
    return
  try:
    plugins = [importlib.util.find_spec(m) for m in ("libtpu", "jax_plugins.xla_cuda12")]
  except ImportError:
    plugins = [importlib.util.find_spec("libtpu")]
  if not any(plugins):
    return
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia[0-9]*"):
    return
  os.environ["JAX_PLATFORMS"] = "cpu"


def _move_store_credentials(args: argparse.Namespace) -> None:
  """Credentials in a tracking URI move to the environment before any command sees the URI.

  So no run.json, sweep.json, child command line or printed line holds them
  (core.tracking.store.adopt_credentials); MLflow reads them from there.
  """
  from core.tracking.store import adopt_credentials  # pylint: disable=g-import-not-at-top

  if isinstance(getattr(args, "tracking_uri", None), str):
    args.tracking_uri = adopt_credentials(args.tracking_uri)
  if os.environ.get("MLFLOW_TRACKING_URI"):
    os.environ["MLFLOW_TRACKING_URI"] = adopt_credentials(os.environ["MLFLOW_TRACKING_URI"])


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  _skip_absent_accelerators()
  if argv[:1] == ["--version"]:
    print(version())
    return 0
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
    parser = build_parser()
    if argv and argv[0] not in ("-h", "--help"):
      parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
    parser.print_help()
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  module_name, _ = COMMANDS[name]
  try:
    parser = command_parser(name)
  except ModuleNotFoundError as e:
    if e.name == module_name:
      print(f"ablax {name}: not available in this version", file=sys.stderr)
      return 2
    raise
  from core.errors import UserError, one_line  # pylint: disable=g-import-not-at-top
  from launch import gin_config  # pylint: disable=g-import-not-at-top

  try:
    args = parser.parse_args(gin_config.rewrite_shorthand(rest))
    _move_store_credentials(args)
    return int(importlib.import_module(module_name).run(args) or 0)
  except UserError as e:
    # Bad input, from any command: one line naming the cause. ABLAX_DEBUG=1 keeps the
    # traceback, for when the message is not enough.
    if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
      raise
    print(f"ablax {name}: {one_line(e)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
