"""The training loop: `train(...)`, the one configurable entry point of a run.

`train` reads top to bottom, in banner sections, like the run it performs:
inputs, the workdir, mesh/step/data, record/tracker/checkpoints, state, compile,
the loop, the end. What must be undone however it ends (the workdir lock, the
checkpointer, the MLflow run's final status) is registered on one ExitStack
where it is acquired.

What a run does, in order: build the mesh, the optimizer and then the step around it
(core.train.step.make_builder), the model's train state (fresh or from the newest
readable checkpoint) and the data iterator (at the saved position); write the run
directory and open the MLflow run (so a bad store fails before training); compile the
step (timed apart from the steps); then loop: step, check, log, evaluate, checkpoint,
until `num_steps`, SIGTERM or a non-finite value. At the end: a final checkpoint, the
last evaluation, the exported model, the run marked FINISHED.

Data: the global batch is `data_shards` blocks of rows, each from its own stream
of records, and each process reads only the blocks holding its devices' rows
(core.train.host_input, which also states what the loop reads of the data: TrainData).
The batches depend on data_shards, not on the number of processes or devices, which is
what makes a 2-process or 8-device run reproduce a 1-device run with the same data_shards.

Evaluation: one list of evaluators (core.train.evaluators: the held-out loss, then the
caller's `evals`), run together every `eval_every` steps and at the end, logged as one
record per evaluation, every key under `eval/`.

Run directory (`workdir`): config.gin and operative_config.gin (written by the
caller's `config_hook`), checkpoints/, metrics.jsonl (the journal: one JSON object per
logged step and per evaluation, MLflow's keys), run.json (the MLflow run, its params, tags
and status, and the step the run finished at), record/ (the run's other artifacts),
mlflow_sync.json (how much of it reached the store), model/ (the exported model) and
train.lock (held by the one trainer of the workdir); core/tracking/local.py. The MLflow
store is the project's one default (core.tracking.store), not per workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from core.model.config import ModelConfig
from core.model.flops import flops_per_token
from core.tokenizer import Tokenizer, check_vocab_matches
from core.tracking import schema
from core.train import checkpoint as ckpt
from core.train import checks
from core.train import mesh as meshlib
from core.train import evaluators as evals_lib
from core.train import host_input, partition, throughput, workdir_lock
from core.train import tracking as trk
from core.train.step import StepBuilder, abstract_batch, device_batch, make_builder

logger = logging.getLogger(__name__)


WorkdirBusyError = workdir_lock.WorkdirBusyError  # another trainer holds the workdir
CheckpointWriteError = ckpt.CheckpointWriteError  # a save failed: the run stops at once


class NonFiniteError(FloatingPointError):
  """A step produced a non-finite loss or gradient; the message names the step."""


@dataclasses.dataclass
class RunConfigRecord:
  """What the caller (launch/) knows about the configuration.

  Attributes:
    params: flat name -> value of the operative config (MLflow params).
    text: the operative config (what was used, defaults included).
    bound_text: the bound config (what the files and bindings said).
    gin_files: the gin files the run was started with.
    config_hash: the hash of the bindings (launch.gin_config.bindings_hash).
  """

  params: dict[str, str]
  text: str = ""
  bound_text: str | None = None
  gin_files: list[Path] = dataclasses.field(default_factory=list)
  config_hash: str | None = None


@dataclasses.dataclass
class TrainResult:
  workdir: Path
  step: int
  losses: dict[int, float]
  eval_losses: dict[int, float]
  run_id: str | None
  status: str  # 'FINISHED' or 'KILLED' (SIGTERM)
  compile_s: float


def train(
  *,
  model: ModelConfig,
  data: Callable[..., host_input.TrainData],
  optimizer: Callable[..., Any],
  num_steps: int,
  batch_size: int,
  workdir: str | Path,
  seed: int = 0,
  data_seed: int | None = None,
  mesh: meshlib.MeshConfig | None = None,
  rules: Mapping[str, Any] | None = None,
  grad_accum_steps: int = 1,
  z_loss: float = 0.0,
  loss_vocab_chunk: int = 0,
  data_shards: int | None = None,
  log_every: int = 10,
  eval_every: int = 0,
  eval_batches: int = 4,
  checkpoint_every: int = 100,
  keep_checkpoints: int = 3,
  async_checkpoints: bool = True,
  tracking_uri: str | None = None,
  experiment: str = "ablax",
  run_name: str | None = None,
  track: bool = True,
  export_model: bool = True,
  config_hook: Callable[[Path], RunConfigRecord] | None = None,
  devices: list | None = None,
  progress: bool = True,
  step_builder: Callable[..., StepBuilder] | None = None,
  evals: Callable[[Any, int], Mapping[str, float]] | None = None,
  pue: float = 1.0,
  grid_region: str | None = None,
  grid_intensity: float | None = None,
  device_power_w: float | None = None,
) -> TrainResult:
  """Trains `model` on `data` with `optimizer`, resuming from `workdir` when it has checkpoints.

  Args:
    model: the architecture.
    data: a factory called as data(batch_size=, seed=, split=, shard_index=,
      shard_count=) returning a core.train.host_input.TrainData: batches with
      their position, tokenizer and manifest (core.data.pipeline.lm_batches
      bound by gin).
    optimizer: a recipe from core.train.optimizer (called with param_axes and
      total_steps).
    num_steps: optimizer updates of the whole run.
    batch_size: global rows per update (over all devices and micro-batches).
    workdir: the run directory; an existing one is resumed.
    seed: initialization and the step RNG.
    data_seed: the order of the data (train and validation); None = `seed`.
      Apart, a "paired" comparison over init seeds sees the same batches, and
      seed-to-seed spread is initialization alone.
    mesh: axis sizes (default: everything on fsdp).
    rules: logical-axis rules overriding partition.DEFAULT_RULES.
    grad_accum_steps: micro-batches per update.
    z_loss: weight of the log(Z)^2 auxiliary loss.
    loss_vocab_chunk: > 0 computes the loss this many vocabulary rows at a
      time, so the (B, T, V) float32 logits never exist (large vocabularies).
    data_shards: the global batch is this many blocks, each from its own
      stream of records; a process reads only the blocks holding its rows
      (core.train.host_input). None = the process count (1 on one host, so
      the whole batch is one stream). Batches depend on it, not on the number
      of processes.
    log_every: steps between progress lines / metrics records.
    eval_every: steps between evaluations (0: only at the end); eval_batches:
      validation batches of the held-out loss (0: no held-out loss).
    checkpoint_every, keep_checkpoints, async_checkpoints: checkpoint policy.
    tracking_uri, experiment, run_name, track: MLflow (process 0 only).
    export_model: write <workdir>/model with core.model_dir.io at the end.
    config_hook: called with the workdir once everything is built; writes the
      config files and returns what to log.
    devices: the devices of the mesh (default: all).
    progress: print progress lines (process 0).
    step_builder: builds the step instead of StepBuilder, with its arguments
      (e.g. core.train.distill.step_builder(teacher_dir=...) for distillation).
    evals: called as evals(model, step) -> {metric: value}, on process 0 with
      the whole parameters (e.g. core.eval.suite.EvalSuite), after the held-out
      loss and at the same steps (core.train.evaluators).
    pue, grid_region, grid_intensity, device_power_w: energy and carbon inputs
      (core.tracking.carbon): facility overhead (PUE), a region of the cited grid
      table or an intensity in g CO2eq/kWh, and the power per device where the
      device table has none (TPU v5e/v5p). Checked before anything is built.
  """
  # == Inputs ================================================================================
  # Everything a user can get wrong is checked before anything is built or written.
  trk.check_carbon_inputs(pue, grid_region, grid_intensity, device_power_w)
  checks.check_run(
    workdir=workdir,
    num_steps=num_steps,
    batch_size=batch_size,
    grad_accum_steps=grad_accum_steps,
    log_every=log_every,
    checkpoint_every=checkpoint_every,
    eval_every=eval_every,
  )
  workdir = Path(workdir).resolve()
  primary = jax.process_index() == 0
  if primary:
    workdir.mkdir(parents=True, exist_ok=True)

  with contextlib.ExitStack() as closing:
    # == The workdir ===========================================================================
    # Claimed before anything in it is written or opened: a second trainer must leave the
    # first one's run alone. A finished run is not run again.
    closing.callback(workdir_lock.lock_for_run(workdir, primary).release)
    finished = _finished_before(workdir, num_steps)
    if finished is not None:
      return finished
    _sync("workdir")

    # == Mesh, step and data ===================================================================
    # The optimizer comes first (its recipe reads the parameters' logical axes) and the step
    # builder is made around it; the data comes after, since which rows a process reads
    # depends on the batch sharding.
    mesh_obj = meshlib.make_mesh(mesh or meshlib.MeshConfig(), devices)
    builder = make_builder(
      model,
      optimizer,
      mesh_obj,
      partition.merged_rules(rules),
      num_steps=num_steps,
      grad_accum_steps=grad_accum_steps,
      z_loss=z_loss,
      loss_vocab_chunk=loss_vocab_chunk,
      step_builder=step_builder,
    )
    # The rows of the batch this process's devices hold; the sequence length does not
    # change which rows those are.
    rows = host_input.process_rows(builder.batch_sharding((batch_size, 1)), (batch_size, 1))
    data_seed = seed if data_seed is None else data_seed
    train_data = host_input.HostShardedBatches(
      data,
      batch_size=batch_size,
      seed=data_seed,
      shards=data_shards or jax.process_count(),
      rows=rows,
    )
    checks.check_seq_len(model, train_data.seq_len)
    if train_data.tokenizer is not None:
      # A model whose table disagrees with the data's ids trains on garbage or fails deep in XLA.
      check_vocab_matches(
        train_data.tokenizer.vocab_size, model.vocab_size, where="train: data tokenizer"
      )

    # == Record, tracker, checkpoints ==========================================================
    # The MLflow run opens here, so a store that cannot be written fails before any step.
    # From here on the run ends FINISHED, KILLED or FAILED (with the error) in MLflow.
    record = config_hook(workdir) if (config_hook and primary) else None
    tracker = trk.start_tracker(
      workdir, tracking_uri=tracking_uri, experiment=experiment, run_name=run_name, enabled=track
    )
    checkpointer = ckpt.Checkpointer(
      workdir / "checkpoints", keep=keep_checkpoints, async_save=async_checkpoints
    )
    ending = {"status": "FAILED"}

    def end_run(exc_type, exc, tb) -> bool:
      del tb
      try:
        checkpointer.close()
      finally:
        error = None if exc is None else f"{exc_type.__name__}: {exc}"
        tracker.end(ending["status"] if exc is None else "FAILED", error=error)
        note = trk.undelivered_note(workdir, tracker)
        if note:
          _say(primary, note)
      return False

    closing.push(end_run)

    # == State: fresh or resumed ===============================================================
    abstract = builder.abstract_state()
    restored = checkpointer.restore_latest(abstract)
    saved_meta: dict = {}
    if restored is None:
      start_step, state = 0, builder.init(seed)
      _say(primary, f"new run in {workdir} (mesh {meshlib.describe(mesh_obj)})")
    else:
      start_step, state, data_state, saved_meta = restored
      train_data.set_state(data_state)
      _say(primary, f"resuming {workdir} from step {start_step}")
      # Steps past the checkpoint are in the journal (and perhaps the store) already.
      tracker.resume(start_step, say=lambda m: _say(primary, m))
    first = host_input.Prefetch(train_data)
    seq_len = first.peek()["inputs"].shape[1]
    checks.check_seq_len(model, seq_len)
    if primary:
      trk.log_run_record(
        tracker,
        record,
        builder,
        model,
        mesh_obj,
        seq_len,
        batch_size,
        start_step,
        train_data.manifest,
        train_data.shards,
      )
    energy = (
      trk.energy_meter(
        jax.devices()[0].device_kind,
        jax.device_count(),
        resume_from=saved_meta.get("energy"),
        pue=pue,
        grid_region=grid_region,
        grid_intensity=grid_intensity,
        device_power_w=device_power_w,
      )
      if primary
      else None
    )

    # == Compile ===============================================================================
    # Timed apart from the steps, so tokens/s and MFU are of training alone.
    shape = (batch_size, seq_len)
    t0 = time.perf_counter()
    inputs = builder.step_inputs()
    step_fn = builder.build(shape).lower(state, abstract_batch(builder, shape), inputs).compile()
    compile_s = time.perf_counter() - t0
    _say(primary, f"compiled the train step in {compile_s:.1f}s")
    tracker.log_metrics({schema.COMPILE_S: compile_s}, step=start_step)

    # == What the loop reports: logged steps and evaluations ===================================
    fpt = flops_per_token(model, seq_len)
    tokens_per_step = batch_size * seq_len
    peak, peak_source = throughput.peak_flops(mesh_obj.devices.flat, model.dtype)
    meter = throughput.Meter(fpt, peak, num_steps, start_step)
    terminate = _TermFlag()
    losses: dict[int, float] = {}
    eval_losses: dict[int, float] = {}
    pending: list[tuple[int, dict, int]] = []  # (step, device metrics, tokens in its batch)
    last_saved = start_step
    # The held-out loss, then the caller's evaluations: one list, one record per evaluation.
    evaluations = evals_lib.evaluators(builder, data, shape, data_seed, eval_batches, evals)

    def resolve(keep_last: int) -> None:
      """Reads back the metrics of all but the newest `keep_last` dispatched steps.

      Reading a step's metrics waits for it; keeping one in flight lets the host
      prepare the next batch while the devices run.
      """
      while len(pending) > keep_last:
        s, m, n_tokens = pending.pop(0)
        host = {k: float(v) for k, v in jax.device_get(m).items()}
        meter.add_tokens(n_tokens)
        if not host["finite"]:
          checkpointer.wait()
          good = checkpointer.steps()
          raise NonFiniteError(
            f"non-finite {'loss' if not math.isfinite(host['loss']) else 'gradient'} at step "
            f"{s} (loss={host['loss']}, grad_norm={host['grad_norm']}); the update was not "
            f"applied; last good checkpoint: "
            f"{('step ' + str(good[-1])) if good else 'none'} in {checkpointer.directory}"
          )
        losses[s] = host["loss"]
        if s % log_every == 0 or s == num_steps:
          rates = meter.report(s)
          line = {
            "step": s,
            "loss": host["loss"],
            "z_loss": host["z_loss"],
            "grad_norm": host["grad_norm"],
            "param_norm": host["param_norm"],
            **rates,
            # Cumulative, so curves can be drawn against tokens or compute, not steps.
            "tokens": s * tokens_per_step,
            "flops": s * tokens_per_step * fpt,
          }
          if builder.schedule is not None:
            line["learning_rate"] = float(builder.schedule(s - 1))  # what update s applied
          if primary:
            # The ETA is for the console and the journal; a store holds what happened.
            tracker.log_metrics(
              {f"{schema.TRAIN}{k}": v for k, v in line.items() if k not in ("step", "eta_s")},
              step=s,
              eta_s=rates["eta_s"],
            )
            if energy is not None and s < num_steps:  # the last step's: once, by trk.finish_record
              tracker.log_metrics(trk.energy_metrics(energy), step=s)
            if progress:
              print(
                f"step {s}/{num_steps} | loss {host['loss']:.4f} | "
                f"{throughput.format_rate(rates['tokens_per_s'])} tok/s | "
                f"MFU {100 * rates['mfu']:.1f}% | "
                f"ETA {throughput.format_duration(rates['eta_s'])}",
                flush=True,
              )

    def evaluate(step: int) -> None:
      """Every evaluator at `step` (every process takes part); process 0 logs them as one record."""
      if not evaluations:
        return
      resolve(0)  # never evaluate parameters that a later check would reject
      metrics: dict[str, float] = {}
      for evaluator in evaluations:
        metrics.update(evaluator(state.params, step))
      if schema.EVAL_LOSS in metrics:
        eval_losses[step] = metrics[schema.EVAL_LOSS]
      if primary and metrics:
        tracker.log_metrics(metrics, step=step)  # the journal, then the store

    def save(step: int, data_state: dict, wait: bool = False) -> None:
      nonlocal last_saved
      resolve(0)  # never save parameters that a later check would reject
      meta = {"time": time.time()}
      if energy is not None:
        meta["energy"] = trk.energy_reading(energy)  # so a resumed run's figures stay cumulative
      checkpointer.save(step, state, host_input.global_state(data_state), meta, wait=wait)
      last_saved = step

    # == Train =================================================================================
    step = start_step
    data_state = None
    try:
      while step < num_steps:
        batch, data_state = first.next()
        state, m = step_fn(state, device_batch(batch, builder.batch_sharding, batch_size), inputs)
        step += 1
        pending.append((step, m, batch["inputs"].size))
        resolve(1)
        # The last step's evaluation waits for the final checkpoint, below: a failing
        # evaluation must not cost the trained state.
        if eval_every and step % eval_every == 0 and step < num_steps:
          evaluate(step)
        if checkpoint_every and step % checkpoint_every == 0 and step < num_steps:
          save(step, data_state)
        checkpointer.check()  # a background save that failed stops the run now
        if terminate.agreed():
          if last_saved != step:
            save(step, data_state)
          checkpointer.wait()
          _say(primary, f"SIGTERM: saved step {step} in {checkpointer.directory}; exiting")
          tracker.flush()
          ending["status"] = "KILLED"
          return TrainResult(
            workdir, step, losses, eval_losses, tracker.run_id, "KILLED", compile_s
          )
      # == The end: last checkpoint, evaluations ===============================================
      resolve(0)
      if step > last_saved or not checkpointer.steps():
        save(step, data_state if data_state is not None else train_data.get_state(), wait=True)
      evaluate(step)
    finally:
      terminate.restore()
      first.close()

    # == Export and finish =====================================================================
    checkpointer.wait()
    if export_model:
      _export(
        workdir, builder, state, model, tracker, primary, _tokenizer_path(train_data.tokenizer)
      )
    if primary:
      trk.finish_record(tracker, workdir, record, peak_source, energy, step)
      trk.mark_finished(workdir, step)
    ending["status"] = "FINISHED"
    return TrainResult(workdir, step, losses, eval_losses, tracker.run_id, "FINISHED", compile_s)


# -- helpers ------------------------------------------------------------------------------


def _say(primary: bool, message: str) -> None:
  if primary:
    print(message, flush=True)
  logger.info(message)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _finished_before(workdir: Path, num_steps: int) -> TrainResult | None:
  """The result of a run that already finished `num_steps` here, else None (train)."""
  step = trk.read_run_file(workdir).get(trk.FINISHED_STEP) if jax.process_index() == 0 else None
  ckpt_dir = workdir / "checkpoints"
  saved = ckpt_dir.is_dir() and step is not None and (ckpt_dir / str(step)).is_dir()
  step = step if saved and step >= num_steps else -1
  if jax.process_count() > 1:
    step = int(multihost_utils.broadcast_one_to_all(np.int32(step)))
  if step < 0:
    return None
  run_id = trk.read_run_file(workdir).get(schema.RUN_ID_KEY)
  _say(
    jax.process_index() == 0,
    f"{workdir} finished at step {step} before; nothing to do (to train further, raise "
    f"num_steps; to start over, use another workdir)",
  )
  return TrainResult(workdir, step, {}, {}, run_id, "FINISHED", 0.0)


def _export(
  workdir: Path,
  builder: StepBuilder,
  state,
  model: ModelConfig,
  tracker,
  primary: bool,
  tokenizer: str | None,
) -> None:
  from core.model_dir import io  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  # Whole arrays on every process (parameters may be sharded across hosts); then process 0
  # writes the model directory alone (save_model scopes orbax to the calling process).
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if not primary:
    return
  module = nnx.merge(builder.graphdef, jax.tree.map(np.asarray, params))
  out = io.save_model(
    workdir / "model",
    module,
    model,
    tokenizer_path=tokenizer,
    overwrite=True,
    metadata={"source": f"train:{tracker.run_id or workdir}", "step": int(state.step)},
  )
  print(f"exported the model to {out}", flush=True)


def _tokenizer_path(tokenizer: Tokenizer | None) -> str | None:
  """The data tokenizer's file, exported with the model (None: the data has no tokenizer)."""
  return tokenizer.path if tokenizer is not None and Path(tokenizer.path).is_file() else None


class _TermFlag:
  """SIGTERM sets a flag the loop checks after each step; all processes agree on it."""

  def __init__(self):
    self.flag = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.flag = True

  def agreed(self) -> bool:
    if jax.process_count() == 1:
      return self.flag
    # A signal reaching one process must stop all of them at the same step,
    # or the others would wait forever in the checkpoint's collectives.
    flags = multihost_utils.process_allgather(np.int32(self.flag))
    return bool(np.max(flags))

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
