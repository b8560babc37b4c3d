"""Knowledge distillation (Gemma 2): train a student on a teacher's next-token distributions.

Gemma 2's small models minimize, at every position, the cross-entropy between
the teacher's and the student's next-token distributions,
-sum_x P_T(x | ctx) log P_S(x | ctx), instead of the log-likelihood of the
one observed token (Gemma Team 2024b, section 3.2). Options here:

- temperature tau: both distributions are softened by dividing the logits by
  tau, and the loss is multiplied by tau^2 so its gradients keep their scale
  (Hinton et al. 2015);
- top_k: keep only the teacher's k most likely tokens and lump the rest of the
  vocabulary into one "other" class (what an offline distillation run would
  store: k log-probabilities per position, the rest implied). The student is
  scored on the same k + 1 classes, so it keeps the teacher's tail mass.
  Renormalizing the k probabilities instead would teach the student that every
  other token has probability 0: its held-out loss then explodes on the many
  observed tokens outside the teacher's top k. None keeps the whole vocabulary;
- objective: 'cross_entropy' (Gemma 2) or 'kl' = cross-entropy minus the
  teacher's entropy. Both have the same gradient; KL is 0 when the student
  matches the teacher, which makes the reported loss easier to read;
- alpha: weight of the soft loss; 1 - alpha weighs the usual next-token loss.

The teacher is an ablax model directory (core.model_dir.io), any size, but it must
share the student's tokenizer: same vocabulary size and, when both record their
tokenizer file, the same file (sha256). Held-out evaluation stays the plain
next-token loss, so a distilled run and a run from scratch compare directly.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from core.errors import UserError
from core.model_dir import io
from core.train import partition
from core.train.host_input import TrainData
from core.train.loss import cross_entropy
from core.train.step import StepBuilder

logger = logging.getLogger(__name__)

_OBJECTIVES = ("cross_entropy", "kl")


class DistillationError(UserError, ValueError):
  """A teacher and student that cannot be distilled together, or bad options."""


# -- the loss --------------------------------------------------------------------------------


def _soft_cross_entropy(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  loss_mask: jax.Array,
  *,
  temperature: float = 1.0,
  top_k: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sum of soft cross-entropies, sum of KL divergences, number of tokens) over loss_mask.

  Per position: CE = -sum_x p_T(x) log p_S(x) and KL = CE - H(p_T), with
  p = softmax(logits / temperature); when top_k is set, both distributions are
  coarsened to the teacher's top_k ids plus one class holding the rest of the
  vocabulary. Both scaled by temperature^2. Sums, like
  core.train.loss.cross_entropy, so micro-batches and shards add up.
  """
  if temperature <= 0:
    raise DistillationError(f"temperature must be > 0, got {temperature}")
  s = student_logits.astype(jnp.float32) / temperature
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
  log_q = jax.nn.log_softmax(s, axis=-1)
  log_p = jax.nn.log_softmax(t, axis=-1)
  if top_k is not None and top_k < t.shape[-1]:
    if top_k < 1:
      raise DistillationError(f"top_k must be >= 1 or None, got {top_k}")
    _, ids = jax.lax.top_k(t, top_k)
    log_p = _with_rest(jnp.take_along_axis(log_p, ids, axis=-1))
    log_q = _with_rest(jnp.take_along_axis(log_q, ids, axis=-1))
  p = jnp.exp(log_p)
  ce = -jnp.sum(p * log_q, axis=-1)
  kl = jnp.sum(p * (log_p - log_q), axis=-1)
  mask = loss_mask.astype(jnp.float32)
  scale = temperature**2
  return scale * jnp.sum(ce * mask), scale * jnp.sum(kl * mask), jnp.sum(mask)


def _with_rest(log_top: jax.Array) -> jax.Array:
  """log-probabilities of k classes, with log(1 - their total) appended as class k + 1."""
  total = jax.nn.logsumexp(log_top, axis=-1, keepdims=True)
  # log(1 - e^total) via expm1: exact when the k classes hold almost all the mass; the
  # floor keeps log finite (and 0 * log 0 = 0) when they hold all of it.
  rest = jnp.log(jnp.maximum(-jnp.expm1(total), jnp.finfo(jnp.float32).tiny))
  return jnp.concatenate([log_top, rest], axis=-1)


# -- the teacher --------------------------------------------------------------------------------


def _load_teacher(
  teacher_dir: str, student_vocab_size: int, student_tokenizer_sha256: str | None = None
):
  """(teacher model, config, manifest) of `teacher_dir`, checked against the student.

  Raises:
    DistillationError: the vocabularies differ, or both sides name their
      tokenizer file and the files differ.
  """
  try:
    model, config, meta = io.load_model(teacher_dir)
  except io.ModelIOError as e:
    raise DistillationError(f"cannot load the teacher: {e}") from None
  if config.vocab_size != student_vocab_size:
    raise DistillationError(
      f"teacher and student must share the tokenizer: the teacher in {teacher_dir} has "
      f"vocab_size {config.vocab_size}, the student {student_vocab_size}. Distill with the "
      "teacher's tokenizer (lm_batches.tokenizer = '<teacher>/tokenizer.model') and "
      f"ModelConfig.vocab_size = {config.vocab_size}"
    )
  teacher_sha = meta.get("tokenizer_sha256")
  if teacher_sha and student_tokenizer_sha256 and teacher_sha != student_tokenizer_sha256:
    raise DistillationError(
      f"teacher and student must share the tokenizer: the teacher in {teacher_dir} was "
      f"trained with tokenizer sha256 {teacher_sha[:12]}..., the student's data uses "
      f"{student_tokenizer_sha256[:12]}... (same vocab_size, different pieces). Use the "
      f"teacher's tokenizer: lm_batches.tokenizer = '{meta.get('tokenizer_path')}'"
    )
  if not teacher_sha or not student_tokenizer_sha256:
    logger.warning(
      "teacher %s: tokenizer file not compared (%s records none); only the "
      "vocabulary size was checked",
      teacher_dir,
      "the teacher" if not teacher_sha else "the student's data",
    )
  return model, config, meta


# -- the step ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _DistillStepBuilder(StepBuilder):
  """A StepBuilder whose training loss (its `loss` hook) is the distillation loss.

  The teacher's parameters are its step_inputs(); the rest, the held-out
  evaluation included, is StepBuilder's.

  Attributes (besides StepBuilder's):
    teacher_dir: the teacher's ablax model directory.
    temperature, top_k, objective, alpha: see the module docstring.
    student_tokenizer_sha256: the student's tokenizer file hash, compared with
      the teacher's (None: compare vocabulary sizes only).
  """

  teacher_dir: str = ""
  temperature: float = 1.0
  top_k: int | None = None
  objective: str = "cross_entropy"
  alpha: float = 1.0
  student_tokenizer_sha256: str | None = None

  def __post_init__(self):
    super().__post_init__()
    if not self.teacher_dir:
      raise DistillationError("distillation needs teacher_dir (an ablax model directory)")
    if self.loss_vocab_chunk:
      raise DistillationError(
        "distillation compares whole teacher and student logits; loss_vocab_chunk must be 0 with it"
      )
    if self.objective not in _OBJECTIVES:
      raise DistillationError(f"objective must be one of {_OBJECTIVES}, got {self.objective!r}")
    if not 0.0 <= self.alpha <= 1.0:
      raise DistillationError(f"alpha must be in [0, 1], got {self.alpha}")
    if self.temperature <= 0:
      raise DistillationError(f"temperature must be > 0, got {self.temperature}")
    teacher, self.teacher_config, _ = _load_teacher(
      self.teacher_dir, self.config.vocab_size, self.student_tokenizer_sha256
    )
    self.teacher_graphdef, state = nnx.split(teacher, nnx.Param)
    # Sharded like the student's parameters (ZeRO-3 over fsdp), so a large teacher is
    # spread over the devices rather than copied onto each; it reaches the step as its
    # third argument (step_inputs), never as a constant of the compiled program.
    self.teacher_shardings = partition.named(
      self.mesh, partition.param_specs(state, self.mesh, self.rules)
    )
    self.teacher_params = jax.device_put(nnx.to_pure_dict(state), self.teacher_shardings)

  def step_inputs(self):
    return self.teacher_params

  def step_input_shardings(self):
    return self.teacher_shardings

  def loss(self, params, batch, inputs):
    """The distillation loss (StepBuilder's one hook); `inputs` are the teacher's parameters."""
    student = nnx.merge(self.graphdef, params)
    logits = student(batch["inputs"], batch["positions"], batch["segment_ids"])
    hard_sum, z_sum, tokens = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    teacher = nnx.merge(self.teacher_graphdef, inputs)
    teacher_logits = teacher(batch["inputs"], batch["positions"], batch["segment_ids"])
    ce_sum, kl_sum, _ = _soft_cross_entropy(
      logits, teacher_logits, batch["loss_mask"], temperature=self.temperature, top_k=self.top_k
    )
    soft_sum = kl_sum if self.objective == "kl" else ce_sum
    return self.alpha * soft_sum + (1.0 - self.alpha) * hard_sum, z_sum, tokens


def step_builder(
  *,
  teacher_dir: str,
  temperature: float = 1.0,
  top_k: int | None = None,
  objective: str = "cross_entropy",
  alpha: float = 1.0,
  student_tokenizer_sha256: str | None = None,
  data: Callable[..., TrainData] | None = None,
) -> Callable[..., StepBuilder]:
  """A factory with StepBuilder's signature that builds a distillation StepBuilder.

  The module's one entry point: pass it as core.train.loop.train(step_builder=...)
  (gin/train/distill.gin). `data`, the run's data factory, gives the student's
  tokenizer hash when student_tokenizer_sha256 is not set, so a tokenizer
  mismatch stops the run before it starts.
  """
  if student_tokenizer_sha256 is None and data is not None:
    tokenizer = data(batch_size=1, seed=0, split="train", shard_index=0, shard_count=1).tokenizer
    student_tokenizer_sha256 = tokenizer.sha256 if tokenizer is not None else None

  def make(*args: Any, **kwargs: Any) -> _DistillStepBuilder:
    return _DistillStepBuilder(
      *args,
      **kwargs,
      teacher_dir=teacher_dir,
      temperature=temperature,
      top_k=top_k,
      objective=objective,
      alpha=alpha,
      student_tokenizer_sha256=student_tokenizer_sha256,
    )

  return make
