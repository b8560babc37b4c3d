"""What a run evaluates: one list of evaluators, each (params, step) -> {metric: value}.

train() calls every evaluator of `evaluators(...)` at the same steps (every
eval_every steps and at the end), on every process, with the train state's
parameters as they are sharded; process 0 logs what they return as one record
(metrics.jsonl and MLflow). Every key is under core.tracking.schema.EVAL:
`eval/loss`, `eval/loss_se`, `eval/tokens` from the held-out loss here, and
`eval/heldout/...`, `eval/mc/...`, `eval/memorization/...` from core.eval (the
keys `ablax eval` logs for a model directory).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils

from core.tracking import schema
from core.train.host_input import TrainData
from core.train.step import StepBuilder, device_batch

logger = logging.getLogger(__name__)


class Evaluator(Protocol):
  def __call__(self, params: Any, step: int) -> Mapping[str, float]:
    """Metrics of `params` (the train state's pure dict) at `step`; called on every process."""


class HeldoutLoss:
  """Held-out loss on the first `batches` validation batches (the same ones each time).

  The builder's held-out step (the next-token loss, whatever the training loss)
  runs sharded like the train step, so every process takes part and gets the
  same values.
  """

  def __init__(
    self, builder: StepBuilder, data: Callable[..., TrainData], shape, seed: int, batches: int
  ):
    self.builder, self.data, self.shape, self.seed = builder, data, shape, seed
    self.batches = batches
    self.fn = None
    self.disabled = False

  def __call__(self, params, step: int) -> dict[str, float]:
    if self.disabled:
      return {}
    try:
      it = self.data(
        batch_size=self.shape[0], seed=self.seed, split="validation", shard_index=0, shard_count=1
      )
    except Exception as e:  # noqa: BLE001  a source without a validation split
      logger.warning("no held-out evaluation: the data has no validation split (%s)", e)
      self.disabled = True
      return {}
    if self.fn is None:
      self.fn = self.builder.build_eval(self.shape)
    total = squares = tokens = 0.0
    for _, batch in zip(range(self.batches), it):
      if batch["inputs"].shape != tuple(self.shape):
        break
      loss_sum, sq_sum, n = self.fn(params, device_batch(batch, self.builder.batch_sharding))
      total, squares, tokens = total + float(loss_sum), squares + float(sq_sum), tokens + float(n)
    loss = total / max(tokens, 1.0)
    # The eval set's own noise: the standard error of a mean over `tokens` token losses.
    # A difference between runs smaller than a few of these is not resolved by this set.
    var = max(squares / max(tokens, 1.0) - loss * loss, 0.0) * tokens / max(tokens - 1.0, 1.0)
    se = math.sqrt(var / max(tokens, 1.0))
    if jax.process_index() == 0:  # launch.sweep_view reads this line from a point's log
      print(
        f"step {step} | held-out loss {loss:.4f} ± {se:.4f} (standard error over "
        f"{int(tokens)} tokens)",
        flush=True,
      )
    return {schema.EVAL_LOSS: loss, schema.EVAL_LOSS_SE: se, schema.EVAL_TOKENS: tokens}


class ModelEvals:
  """The caller's evaluations of the whole model, evals(model, step) -> metrics.

  E.g. core.eval.suite.EvalSuite. They run unsharded on one process: every
  process takes part in gathering the parameters (they may be sharded across
  hosts), then process 0 alone evaluates whole local copies (no collectives),
  so the others return nothing and wait for it at the next step.
  """

  def __init__(self, evals: Callable[[Any, int], Mapping[str, Any]], builder: StepBuilder):
    self.evals, self.graphdef = evals, builder.graphdef

  def __call__(self, params, step: int) -> dict[str, float]:
    from flax import nnx  # pylint: disable=g-import-not-at-top

    if jax.process_count() > 1:
      params = multihost_utils.process_allgather(params, tiled=True)
      if jax.process_index() != 0:
        return {}
      params = jax.tree.map(np.asarray, params)
    return {
      k: float(v)
      for k, v in self.evals(nnx.merge(self.graphdef, params), step).items()
      if isinstance(v, (int, float, np.floating, np.integer))
    }


def evaluators(
  builder: StepBuilder,
  data: Callable[..., TrainData],
  shape,
  seed: int,
  eval_batches: int,
  evals: Callable[[Any, int], Mapping[str, Any]] | None,
) -> list[Evaluator]:
  """The run's evaluators: the held-out loss (eval_batches > 0), then the caller's `evals`."""
  out: list[Evaluator] = []
  if eval_batches:
    out.append(HeldoutLoss(builder, data, shape, seed, eval_batches))
  if evals is not None:
    out.append(ModelEvals(evals, builder))
  return out
