"""`ablax` entry point.

Each subcommand lives in its own module `launch/<name>_cmd.py` exposing
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only when
their subcommand runs, so `ablax --help` stays fast and a broken optional
dependency of one command never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("launch.train_cmd", "train a model from gin files"),
    "sweep": ("launch.sweep_cmd", "run an ablation sweep (grid x seeds)"),
    "compare": ("launch.compare_cmd", "compare the runs of a sweep from MLflow"),
    "reproduce": ("launch.reproduce_cmd", "re-run an MLflow run from its recorded config"),
    "params": ("launch.params_cmd", "count a model's parameters without allocating it"),
    "plan": ("launch.plan_cmd", "compile the train step for a TPU slice or GPU node: memory, "
                                "FLOPs, time, energy"),
    "carbon": ("launch.carbon_cmd", "project energy and carbon of a training run"),
    "eval": ("launch.eval_cmd", "evaluate a checkpoint"),
    "score": ("launch.score_cmd", "per-token log-probabilities of a text under a checkpoint"),
    "sample": ("launch.sample_cmd", "sample from a checkpoint"),
    "tokenizer": ("launch.tokenizer_cmd", "train or subset SentencePiece tokenizers"),
    "data": ("launch.data_cmd", "inspect a data pipeline"),
    "import-hf": ("launch.import_hf_cmd", "convert a Hugging Face checkpoint to ablax"),
    "tracking": ("launch.tracking_cmd", "deliver records a run kept in its workdir while the store was down"),
    "launch": ("launch.tpu_vm_cmd", "start a run on other machines (tpu-vm: every worker of a TPU pod slice)"),
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="ablax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (_, help_text) in COMMANDS.items():
    sub.add_parser(name, help=help_text, add_help=False)
  return parser


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


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  _skip_absent_accelerators()
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
    parser = build_parser()
    if argv and argv[0] not in ("-h", "--help"):
      parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
    parser.print_help()
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  module_name, help_text = COMMANDS[name]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name == module_name:
      print(f"ablax {name}: not available in this version", file=sys.stderr)
      return 2
    raise
  parser = argparse.ArgumentParser(prog=f"ablax {name}", description=help_text)
  module.add_arguments(parser)
  args = parser.parse_args(rest)
  return int(module.run(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
