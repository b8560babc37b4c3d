"""Checks of a run's arguments, its workdir and its data's length, before anything costly.

Each failure is a RunConfigError (a core.errors.UserError): `ablax train`
prints its message as one line and exits 2. Values that Python would accept
but that make no run (0 steps, logging every 0 steps, a negative checkpoint
interval) are rejected here rather than deep in the loop, or, worse, accepted:
`num_steps = 0` would otherwise mark the run FINISHED and export an untrained model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax

from core.errors import UserError


class RunConfigError(UserError, ValueError):
  """A train() argument, workdir or data length that cannot make a run."""


def check_run(
  *,
  workdir: str | os.PathLike,
  num_steps: int,
  batch_size: int,
  grad_accum_steps: int,
  log_every: int,
  checkpoint_every: int,
  eval_every: int,
) -> None:
  """Rejects arguments that cannot make a run, then a workdir process 0 cannot write."""
  _at_least("num_steps", num_steps, 1, "the run would train nothing and export its initial weights")
  _at_least("batch_size", batch_size, 1)
  _at_least("grad_accum_steps", grad_accum_steps, 1, "1 means no accumulation")
  _at_least("log_every", log_every, 1)
  _at_least("checkpoint_every", checkpoint_every, 0, "0 saves only at the end")
  _at_least("eval_every", eval_every, 0, "0 evaluates only at the end")
  if batch_size % grad_accum_steps:
    raise RunConfigError(
      f"train.batch_size {batch_size} is not a multiple of "
      f"train.grad_accum_steps {grad_accum_steps}"
    )
  if jax.process_index() == 0:
    check_workdir(workdir)


def check_workdir(workdir: str | os.PathLike) -> None:
  """Creates `workdir` if needed and writes (then removes) a file in it; else RunConfigError.

  A real write, not os.access: permission bits say nothing of a read-only mount,
  and nothing at all to root.
  """
  path = Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write_check_", dir=path)
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    reason = e.strerror or type(e).__name__
    raise RunConfigError(
      f"workdir {path} cannot be written ({reason}); give a --workdir on a writable filesystem"
    ) from None


def check_seq_len(model, seq_len: int | None) -> None:
  """The data's rows fit the model's context (ModelConfig.max_seq_len), whatever its positions.

  Learned positions have no row past max_seq_len; RoPE would run, but a model
  trained past the length it records is not the model its config describes
  (sampling and planning read max_seq_len). Raising max_seq_len is the explicit choice.
  Checked with the length the data declares, before the state is built, and
  again with the first batch's. None: not known yet.
  """
  if seq_len is not None and seq_len > model.max_seq_len:
    raise RunConfigError(
      f"the data's rows are {seq_len} tokens, longer than ModelConfig.max_seq_len "
      f"{model.max_seq_len} (position_embedding={model.position_embedding!r}); shorten the "
      "data's seq_len or raise ModelConfig.max_seq_len"
    )


def _at_least(name: str, value, low: int, note: str = "") -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    hint = f" ({note})" if note else ""
    raise RunConfigError(f"train.{name} must be an int >= {low}, got {value!r}{hint}")
