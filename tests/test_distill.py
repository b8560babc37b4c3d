"""Distillation: the soft loss, teacher checks, and a tiny distilled run against a teacher."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from core.model.transformer import Transformer
from core.model_dir import io
from core.train import distill, loop, optimizer, synthetic
from core.train import mesh as meshlib
from core.train.mesh import MeshConfig
from core.train.loss import cross_entropy
from core.train.step import BATCH_KEYS
from tests.tiny_model import tiny_config


def np_soft_ce(student, teacher, mask, temperature, top_k=None):
  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  log_q = log_softmax(student.astype(np.float64) / temperature)
  log_p = log_softmax(teacher.astype(np.float64) / temperature)
  if top_k is not None:
    # The teacher's top k classes, plus one class for the rest of the vocabulary.
    ids = np.argsort(-log_p, axis=-1)[..., :top_k]

    def coarsen(log_x):
      top = np.take_along_axis(log_x, ids, -1)
      return np.concatenate([top, np.log1p(-np.exp(top).sum(-1, keepdims=True))], -1)

    log_p, log_q = coarsen(log_p), coarsen(log_q)
  p = np.exp(log_p)
  ce = -(p * log_q).sum(-1)
  kl = (p * (log_p - log_q)).sum(-1)
  return (temperature**2 * (ce * mask).sum(), temperature**2 * (kl * mask).sum())


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (2.0, None), (1.0, 3), (0.5, 5)])
def test_soft_cross_entropy_matches_the_definition(temperature, top_k):
  rng = np.random.default_rng(0)
  student = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
  teacher = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
  mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
  ce, kl, n = distill._soft_cross_entropy(
    jnp.asarray(student),
    jnp.asarray(teacher),
    jnp.asarray(mask),
    temperature=temperature,
    top_k=top_k,
  )
  want_ce, want_kl = np_soft_ce(student, teacher, mask, temperature, top_k)
  assert float(n) == mask.sum()
  assert float(ce) == pytest.approx(want_ce, rel=1e-5)
  assert float(kl) == pytest.approx(want_kl, rel=1e-4, abs=1e-5)


def test_soft_loss_limits():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(3, 4, 9)).astype(np.float32))
  other = jnp.asarray(rng.normal(size=(3, 4, 9)).astype(np.float32))
  mask = jnp.ones((3, 4))
  # A student equal to its teacher: KL 0, cross-entropy = the teacher's entropy > 0.
  ce, kl, _ = distill._soft_cross_entropy(logits, logits, mask)
  assert float(kl) == pytest.approx(0.0, abs=1e-5) and float(ce) > 0
  # Top-1 of a teacher that is sure of its argmax is the hard next-token loss on it.
  sure = logits.at[..., 0].set(60.0)
  ce1, kl1, _ = distill._soft_cross_entropy(other, sure, mask, top_k=1)
  hard, _, _ = cross_entropy(other, jnp.zeros((3, 4), jnp.int32), mask)
  assert float(ce1) == pytest.approx(float(hard), rel=1e-5) == pytest.approx(float(kl1), rel=1e-5)
  # top_k >= vocab is the whole distribution.
  full = distill._soft_cross_entropy(other, logits, mask)
  assert np.allclose(distill._soft_cross_entropy(other, logits, mask, top_k=9), full)
  # The gradient moves the student toward the teacher.
  grad = jax.grad(lambda s: distill._soft_cross_entropy(s, logits, mask)[1])(other)
  ce_after = distill._soft_cross_entropy(other - 0.5 * grad, logits, mask)[1]
  assert float(ce_after) < float(full[1])
  with pytest.raises(distill.DistillationError, match="temperature"):
    distill._soft_cross_entropy(other, logits, mask, temperature=0)


def test_top_k_student_keeps_the_teachers_tail_mass():
  # Fit student logits to a teacher by gradient descent on the top-k loss: the student must
  # end with the teacher's top-k probabilities and leave the rest of the vocabulary the
  # teacher's remaining mass, not zero (zero would make held-out loss explode on tail tokens).
  rng = np.random.default_rng(2)
  teacher = jnp.asarray(rng.normal(size=(4, 32)).astype(np.float32))
  mask = jnp.ones((4,))
  loss = lambda s: distill._soft_cross_entropy(s, teacher, mask, top_k=4)[1]  # the KL
  student = jnp.zeros((4, 32))
  step = jax.jit(lambda s: s - 2.0 * jax.grad(loss)(s))
  for _ in range(500):
    student = step(student)
  p, q = jax.nn.softmax(teacher), jax.nn.softmax(student)
  top = jax.lax.top_k(teacher, 4)[1]
  np.testing.assert_allclose(
    np.take_along_axis(q, top, -1), np.take_along_axis(p, top, -1), atol=1e-3
  )
  tail = 1.0 - np.take_along_axis(p, top, -1).sum(-1)
  assert tail.min() > 0.3  # the comparison below is about real mass
  np.testing.assert_allclose(1.0 - np.take_along_axis(q, top, -1).sum(-1), tail, atol=1e-3)


TEACHER = tiny_config(
  vocab_size=128,
  embed_dim=48,
  head_dim=12,
  mlp_dim=96,
  max_seq_len=32,
  norm_placement="pre_post",
  attention_pattern=("local", "global"),
  window=8,
)
STUDENT = TEACHER.replace(embed_dim=32, num_layers=1, head_dim=8, mlp_dim=64)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("teacher")
  tok = root / "tok.model"
  tok.write_bytes(b"not read: only its hash matters here")
  return str(
    io.save_model(
      root / "model", Transformer(TEACHER, rngs=nnx.Rngs(0)), TEACHER, tokenizer_path=tok
    )
  )


def test_teacher_weights_are_a_step_argument_not_program_constants(teacher_dir):
  # Closed over, jit would bake the teacher into the compiled step as constants
  # (replicated, and as large as the teacher); it must arrive as an argument.
  mesh = meshlib.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
  b = distill._DistillStepBuilder(STUDENT, optax.sgd(0.1), mesh, {}, teacher_dir=teacher_dir)
  shape = (2, 16)
  batch = {
    k: jax.ShapeDtypeStruct(shape, np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS
  }
  text = b.build(shape).lower(b.init(0), batch, b.step_inputs()).as_text()
  constants = re.findall(r'dense<"0x([0-9A-Fa-f]+)">', text)
  largest = max((len(c) // 2 for c in constants), default=0)
  assert largest < 1024, f"a {largest}-byte constant in the step: the teacher was closed over"
  assert len(jax.tree.leaves(b.step_inputs())) == len(
    jax.tree.leaves(nnx.state(Transformer(TEACHER, rngs=nnx.Rngs(0)), nnx.Param))
  )


def test_teacher_must_share_the_tokenizer(teacher_dir):
  with pytest.raises(distill.DistillationError, match="vocab_size 128, the student 256"):
    distill._load_teacher(teacher_dir, 256)
  with pytest.raises(distill.DistillationError, match="tokenizer sha256"):
    distill._load_teacher(teacher_dir, 128, student_tokenizer_sha256="0" * 64)
  sha = io.read_manifest(teacher_dir)["tokenizer_sha256"]
  model, config, _ = distill._load_teacher(teacher_dir, 128, student_tokenizer_sha256=sha)
  assert config == TEACHER
  with pytest.raises(distill.DistillationError, match="cannot load the teacher"):
    distill._load_teacher(teacher_dir + "_missing", 128)


def _run(workdir, steps, evals=None, eval_every=0, **distill_options):
  kwargs = dict(
    model=STUDENT,
    data=functools.partial(synthetic.synthetic_batches, vocab_size=128, seq_len=32),
    optimizer=functools.partial(optimizer.llama_adamw, peak_lr=1e-2, warmup_steps=2),
    num_steps=steps,
    batch_size=4,
    workdir=workdir,
    mesh=MeshConfig(1, 1, 1),
    devices=jax.devices()[:1],
    log_every=1,
    eval_every=eval_every,
    eval_batches=1,
    checkpoint_every=0,
    track=False,
    export_model=False,
    progress=False,
    evals=evals,
  )
  make = distill.step_builder(**distill_options, data=kwargs["data"])
  return loop.train(step_builder=make, **kwargs)


def test_distilled_run_learns_the_teacher_and_runs_evaluations(teacher_dir, tmp_path):
  from core.eval.suite import EvalSuite

  seen = []

  def validation():
    return synthetic.synthetic_batches(
      vocab_size=128, seq_len=32, batch_size=2, seed=0, split="validation"
    )

  suite = EvalSuite(heldout_batches={"synthetic": validation}, heldout_max_batches=1)

  def evals(model, step):
    seen.append(step)
    return suite(model, step)

  result = _run(
    tmp_path / "kl",
    12,
    evals=evals,
    eval_every=6,
    teacher_dir=teacher_dir,
    objective="kl",
    top_k=16,
  )
  losses = [result.losses[s] for s in sorted(result.losses)]
  assert losses[-1] < 0.9 * losses[0]  # KL to the teacher falls
  # The held-out loss is the plain next-token loss (comparable with a run from scratch),
  # not the KL: it is near log(vocab) for a student imitating a random teacher.
  assert all(loss > 2.0 for loss in result.eval_losses.values())
  # The loop called the evaluations every eval_every steps and at the end, and logged them.
  assert seen == [6, 12]
  lines = [json.loads(l) for l in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
  logged = [l["step"] for l in lines if "eval/heldout/synthetic/loss" in l]
  assert logged == [6, 12]


def test_distill_step_builder_options_are_checked(teacher_dir):
  from core.train.mesh import make_mesh
  import optax

  mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
  make = functools.partial(distill._DistillStepBuilder, STUDENT, optax.identity(), mesh, {})
  with pytest.raises(distill.DistillationError, match="teacher_dir"):
    make()
  with pytest.raises(distill.DistillationError, match="objective"):
    make(teacher_dir=teacher_dir, objective="mse")
  with pytest.raises(distill.DistillationError, match="alpha"):
    make(teacher_dir=teacher_dir, alpha=2.0)
  with pytest.raises(distill.DistillationError, match="vocab_size"):
    distill._DistillStepBuilder(
      STUDENT.replace(vocab_size=64), optax.identity(), mesh, {}, teacher_dir=teacher_dir
    )


def test_gin_distill_file_builds_the_distillation_step(teacher_dir):
  import gin
  import optax
  from core.train.mesh import make_mesh
  from launch import gin_config

  gin_config.parse(
    ["gin/train/base.gin", "gin/train/distill.gin"],
    [
      f"core.train.distill.step_builder.teacher_dir = '{teacher_dir}'",
      "core.train.distill.step_builder.top_k = 4",
      "core.train.distill.step_builder.data = None",
    ],
    finalize=False,
  )
  make = gin.get_configurable(distill.step_builder)()
  mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
  builder = make(STUDENT, optax.identity(), mesh, {})
  assert isinstance(builder, distill._DistillStepBuilder) and builder.top_k == 4
  assert builder.teacher_config == TEACHER
