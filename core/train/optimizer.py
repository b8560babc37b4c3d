"""Optimizer recipes: optax chains with the schedules and weight-decay masks of the papers.

A recipe is a function `recipe(*, param_axes, total_steps, **hyperparameters)
-> Scheduled` (an optax.GradientTransformation with its learning-rate schedule).
The trainer passes `param_axes` (core.train.step.param_axes: a pure dict
mirroring the parameters, each leaf its tuple of logical axis names) and the
run length; gin files (gin/train/*.gin) bind the hyperparameters. The mask is
computed from logical axes rather than parameter names, so a new module with
a norm or an embedding is handled without touching this file.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

# Logical axes that mark an embedding-like table (rows looked up by id or position).
EMBEDDING_AXES = ("vocab", "positions")


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def decay_mask(param_axes: Mapping[str, Any], decay_embeddings: bool = False) -> Any:
  """True where weight decay applies: matrices, never norms (or 1-d vectors such as biases).

  Embedding tables (input, output and learned positions) are decayed only when
  `decay_embeddings`: LLaMA does not say, and decaying rarely-seen token rows
  toward zero is a known cost, so the choice is the experiment's.
  """

  def one(axes):
    if len(axes) < 2 or "norm" in axes:
      return False
    if any(a in EMBEDDING_AXES for a in axes):
      return decay_embeddings
    return True

  return jax.tree.map(one, param_axes, is_leaf=_is_axes)


def warmup_cosine(
  peak_lr: float, warmup_steps: int, total_steps: int, final_fraction: float = 0.1
) -> optax.Schedule:
  """Linear warmup from 0 to `peak_lr`, then cosine decay to `final_fraction * peak_lr`.

  Decay ends at `total_steps` (LLaMA: 2000 warmup steps, end at 10% of peak).
  """
  warmup_steps = min(int(warmup_steps), max(int(total_steps) - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak_lr,
    warmup_steps=warmup_steps,
    decay_steps=max(int(total_steps), warmup_steps + 1),
    end_value=final_fraction * peak_lr,
  )


class Scheduled(optax.GradientTransformation):
  """A GradientTransformation that also carries its learning-rate schedule.

  Every recipe here returns one; the trainer logs `train/learning_rate` from
  `schedule` (core.train.step.StepBuilder.schedule). Another optax
  transformation logs none.
  """

  schedule: optax.Schedule


def with_schedule(tx: optax.GradientTransformation, schedule: optax.Schedule) -> Scheduled:
  out = Scheduled(tx.init, tx.update)
  out.schedule = schedule
  return out


def llama_adamw(
  *,
  param_axes: Mapping[str, Any],
  total_steps: int,
  peak_lr: float = 3e-4,
  warmup_steps: int = 2000,
  final_fraction: float = 0.1,
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay: float = 0.1,
  decay_embeddings: bool = False,
  clip_norm: float | None = 1.0,
) -> Scheduled:
  """LLaMA's recipe (Touvron et al. 2023, section 2.3).

  AdamW with beta1 0.9, beta2 0.95, decoupled weight decay 0.1 (scaled by the
  learning rate, as AdamW does) on matrices only, global-norm clipping at 1.0,
  linear warmup then cosine decay to 10% of the peak.
  """
  schedule = warmup_cosine(peak_lr, warmup_steps, total_steps, final_fraction)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(
    optax.adamw(
      schedule,
      b1=b1,
      b2=b2,
      eps=eps,
      weight_decay=weight_decay,
      mask=decay_mask(param_axes, decay_embeddings),
    )
  )
  return with_schedule(optax.chain(*parts), schedule)


def adafactor(
  *,
  param_axes: Mapping[str, Any],
  total_steps: int,
  peak_lr: float = 1e-2,
  warmup_steps: int = 1000,
  final_fraction: float = 0.1,
  decay_rate: float = 0.8,
  momentum: float | None = None,
  weight_decay: float = 0.0,
  decay_embeddings: bool = False,
  clip_norm: float | None = 1.0,
  multiply_by_parameter_scale: bool = True,
  factored: bool = True,
) -> Scheduled:
  """Adafactor (Shazeer & Stern 2018) with factored second moments and the same schedule shape.

  Its memory is O(rows + columns) per matrix instead of Adam's two full copies,
  which is why T5/PaLM-style runs used it.
  """
  schedule = warmup_cosine(peak_lr, warmup_steps, total_steps, final_fraction)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(
    optax.adafactor(
      learning_rate=schedule,
      decay_rate=decay_rate,
      momentum=momentum,
      factored=factored,
      multiply_by_parameter_scale=multiply_by_parameter_scale,
      weight_decay_rate=weight_decay or None,
      weight_decay_mask=decay_mask(param_axes, decay_embeddings),
    )
  )
  return with_schedule(optax.chain(*parts), schedule)


def sgd(
  *,
  param_axes: Mapping[str, Any],
  total_steps: int,
  peak_lr: float = 0.1,
  warmup_steps: int = 0,
  final_fraction: float = 0.1,
  momentum: float | None = None,
) -> Scheduled:
  """Plain SGD on the same schedule: a baseline, and easy to reason about in tests."""
  del param_axes
  schedule = warmup_cosine(peak_lr, warmup_steps, total_steps, final_fraction)
  return with_schedule(optax.sgd(schedule, momentum=momentum), schedule)
