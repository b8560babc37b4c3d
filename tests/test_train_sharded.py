"""A (2, 2, 2) mesh reproduces the single-device run, and the shardings are the configured ones."""

import functools

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from core.train import loop, optimizer, partition, synthetic
from core.train import mesh as meshlib
from core.train.checkpoint import Checkpointer
from core.train.mesh import MeshConfig
from core.train.step import StepBuilder, param_axes
from tests.tiny_model import tiny_config

TINY = tiny_config(
  vocab_size=256,
  mlp_dim=64,
  max_seq_len=32,
  activation="swiglu",
  tie_embeddings=False,
  scale_embeddings=False,
)


def _train(workdir, mesh, devices=None, steps=20):
  return loop.train(
    model=TINY,
    data=functools.partial(synthetic.synthetic_batches, vocab_size=256, seq_len=32),
    optimizer=functools.partial(optimizer.llama_adamw, peak_lr=1e-2, warmup_steps=3),
    num_steps=steps,
    batch_size=8,
    workdir=workdir,
    mesh=mesh,
    devices=devices,
    log_every=1,
    eval_batches=0,
    checkpoint_every=0,
    track=False,
    export_model=False,
    progress=False,
  )


def test_sharded_run_matches_single_device(tmp_path):
  assert jax.device_count() == 8
  single = _train(tmp_path / "single", MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  sharded = _train(tmp_path / "sharded", MeshConfig(2, 2, 2))
  steps = sorted(single.losses)
  assert steps == list(range(1, 21)) == sorted(sharded.losses)
  a = np.array([single.losses[s] for s in steps])
  b = np.array([sharded.losses[s] for s in steps])
  np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-5)
  assert a[-1] < a[0] - 0.5  # it learned something: the comparison is not between constants

  # The final checkpoint holds the state in the configured layout.
  mesh = meshlib.make_mesh(MeshConfig(2, 2, 2))
  tx = optimizer.llama_adamw(param_axes=param_axes(TINY), total_steps=20)
  b = StepBuilder(TINY, tx, mesh, partition.merged_rules())
  ck = Checkpointer(tmp_path / "sharded" / "checkpoints")
  step, state, data_state, _ = ck.restore_latest(b.abstract_state())
  ck.close()
  assert step == 20 and data_state == {"step": 20}
  block = state.params["blocks"][0]
  assert block["attn"]["q"].sharding.spec == P("fsdp", "tensor", None)
  assert block["attn"]["o"].sharding.spec == P("tensor", None, "fsdp")
  assert block["mlp"]["gate"].sharding.spec == P("fsdp", "tensor")
  assert state.params["embedder"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert block["mlp_norm"]["scale"].sharding.spec == P(None)
  assert state.opt_state[1][0].mu["blocks"][0]["mlp"]["down"].sharding.spec == P("tensor", "fsdp")
