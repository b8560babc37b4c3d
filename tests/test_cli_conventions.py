"""The command line speaks t5x's gin flags, documents every argument and states its version."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import gin
import pytest

from core.paths import REPO_ROOT
from launch import cli
from launch import gin_config

REPO = REPO_ROOT


def _actions(parser, prefix):
  for action in parser._actions:  # noqa: SLF001
    if isinstance(action, argparse._HelpAction):  # noqa: SLF001
      continue
    if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
      for name, sub in action.choices.items():
        yield f"{prefix} {name}", None, sub
        yield from _actions(sub, f"{prefix} {name}")
      continue
    yield prefix, action, None


def test_every_argument_has_help_and_every_subcommand_a_description():
  undocumented = []
  for name in cli.COMMANDS:
    for where, action, sub in _actions(cli.command_parser(name), name):
      if sub is not None:
        if not sub.description:
          undocumented.append(f"{where}: no description")
      elif action.help != argparse.SUPPRESS and not (action.help or "").strip():
        undocumented.append(f"{where} {'/'.join(action.option_strings) or action.dest}")
  assert not undocumented, undocumented


def test_help_shows_defaults_once_and_the_common_commands(capsys):
  text = cli.command_parser("sample").format_help()
  assert "tokens to generate per prompt (default: 64)" in text
  assert "0 = greedy (default)" in text and "(default) (default" not in text
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert "common commands:" in out and "--gin.NUM_STEPS=50" in out


def test_version(capsys):
  assert cli.main(["--version"]) == 0
  out = capsys.readouterr().out.strip()
  assert out.startswith("ablax ") and "jax " in out


def test_shorthand_is_rewritten_to_a_binding():
  assert gin_config.rewrite_shorthand(
    ["--gin.NUM_STEPS=50", "--workdir", "w", "--gin.core.train.loop.train.seed=3"]
  ) == [
    "--gin_bindings",
    "NUM_STEPS = 50",
    "--workdir",
    "w",
    "--gin_bindings",
    "core.train.loop.train.seed = 3",
  ]
  with pytest.raises(gin_config.GinConfigError, match="--gin.NAME=VALUE"):
    gin_config.rewrite_shorthand(["--gin.NUM_STEPS"])


def _params(args, capsys):
  rc = cli.main(["params", *args])
  out = capsys.readouterr()
  return rc, out


def test_gin_bindings_alias_and_shorthand_reach_the_config(capsys):
  base = ["--gin_file", "gin/models/tiny_llama.gin", "--json"]
  rc, out = _params(base, capsys)
  assert rc == 0, out.err
  total = json.loads(out.out)["total"]
  for extra in (
    ["--gin_bindings", "core.model.config.ModelConfig.num_layers = 1"],
    ["--gin_param", "core.model.config.ModelConfig.num_layers = 1"],
    ["--gin.core.model.config.ModelConfig.num_layers=1"],
  ):
    rc, out = _params(base + extra, capsys)
    assert rc == 0, out.err
    assert json.loads(out.out)["total"] < total
  # An unknown name gets gin's own error, naming the binding; a bad shorthand is one line.
  rc, out = _params(base + ["--gin.core.model.config.ModelConfig.no_such_field=1"], capsys)
  assert rc == 2 and "no_such_field" in out.err and "Traceback" not in out.err
  rc, out = _params(base + ["--gin.NUM_STEPS"], capsys)
  assert rc == 2 and "--gin.NAME=VALUE" in out.err


def test_macros_set_steps_and_batch_and_log_under_the_trainer_keys():
  gin.clear_config()
  try:
    gin_config.parse(
      ["gin/experiments/tiny_llama.gin"],
      gin_config.rewrite_shorthand(["--gin.NUM_STEPS=7"])[1::2],
      finalize=False,
    )
    steps = gin.query_parameter("core.train.loop.train.num_steps")
    assert gin_config.resolve_macro(steps) == 7
    assert gin_config.resolve_macro(gin.query_parameter("core.train.loop.train.batch_size")) == 8
  finally:
    gin.clear_config()

  @gin.configurable("ablax_test_fn")
  def fn(n=0):
    return n

  try:
    for bindings in (["M = 3", "ablax_test_fn.n = %M"], ["ablax_test_fn.n = 3"]):
      gin.parse_config(bindings)
      assert fn() == 3
      ops = gin_config.operative_bindings()
      assert ops["test_cli_conventions.ablax_test_fn.n"] == 3
      assert not any("macro" in k for k in ops)
      gin.clear_config()
  finally:
    gin.clear_config()


def test_search_paths_find_files_and_includes_outside_the_checkout(tmp_path):
  lib = tmp_path / "mine"
  lib.mkdir()
  (lib / "shallow.gin").write_text("include 'gin/models/tiny_llama.gin'\ninclude 'layers.gin'\n")
  (lib / "layers.gin").write_text(
    "from __gin__ import dynamic_registration\n"
    "import core.model.config\n"
    "core.model.config.ModelConfig.num_layers = 1\n"
  )
  elsewhere = tmp_path / "cwd"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != gin_config.SEARCH_PATHS_ENV}
  ablax = [sys.executable, "-m", "launch.cli"]
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  run = lambda *a: subprocess.run(
    [*ablax, "params", *a, "--json"],
    cwd=elsewhere,
    env=env,  # noqa: E731
    capture_output=True,
    text=True,
    timeout=120,
  )
  found = run("--gin_search_paths", str(lib), "--gin_file", "shallow.gin")
  assert found.returncode == 0, found.stderr
  assert "Path not found" not in found.stderr  # gin's probe of each search folder is quiet
  plain = run("--gin_file", "gin/models/tiny_llama.gin")
  assert plain.returncode == 0 and "Path not found" not in plain.stderr
  assert json.loads(found.stdout)["total"] < json.loads(plain.stdout)["total"]
  missing = run("--gin_file", "shallow.gin")
  assert missing.returncode == 2 and "gin file not found: shallow.gin" in missing.stderr
  bad = run("--gin_search_paths", str(tmp_path / "nope"), "--gin_file", "shallow.gin")
  assert bad.returncode == 2 and "is not a folder" in bad.stderr


def test_an_unset_macro_is_named_and_a_direct_binding_needs_none(tmp_path, capsys):
  run = tmp_path / "run.gin"
  run.write_text(
    "include 'gin/models/tiny_llama.gin'\ninclude 'gin/data/embedded.gin'\n"
    "include 'gin/train/base.gin'\ninclude 'gin/train/llama_adamw.gin'\n"
  )
  rc = cli.main(
    [
      "train",
      "--gin_file",
      str(run),
      "--workdir",
      str(tmp_path / "w"),
      "--no_tracking",
      "--gin.BATCH_SIZE=2",
    ]
  )
  err = capsys.readouterr().err
  assert rc == 2 and "nothing sets NUM_STEPS" in err and "--gin.NUM_STEPS=" in err
  assert len(err.strip().splitlines()) == 1
  # Binding the parameter itself overrides the macro reference: nothing else is needed.
  gin.clear_config()
  try:
    gin_config.parse(
      [str(run)], ["core.train.loop.train.num_steps = 3", "core.train.loop.train.batch_size = 2"]
    )
  finally:
    gin.clear_config()
