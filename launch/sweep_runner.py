"""Running a sweep's points as `ablax train` subprocesses under one MLflow parent run.

Each point runs as its own process: gin's configuration is global to a
process, so separate processes are the simple way to give every point its own
configuration, and they let N workers run at once. A child is

  ablax train --gin_file F ... --gin_param P ... --workdir DIR --tracking_uri URI

and before it starts, the sweep creates its MLflow run (nested under the
parent by the tag `mlflow.parentRunId`, tagged `ablax.sweep.point=<point
key>`, the axis values as params) and writes the run id into the child's
`<workdir>/run.json`, the file from which the trainer continues a run. The
point tag is how a re-run of the sweep finds which points are done: a point
whose run is FINISHED is skipped; any other point runs again in its own
workdir, where the trainer resumes from its last checkpoint and continues the
same MLflow run. A point whose workdir a trainer still holds (core.train.workdir_lock)
is running, whatever its MLflow status says, and is not started a second time.
Each child watches the sweep (launch/parent_watch.py) and stops, checkpointing,
when the sweep is gone, so a sweep killed outright leaves no orphans training.

Workers on one machine share it: with N workers on C cores each child gets
C // N cores (pinned, so they do not trample each other's caches) and XLA's
CPU thread pools are sized to match; with GPUs, each worker gets its own
slice of the visible devices, or a share of GPU memory when there are fewer
devices than workers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from analysis.runs import (
  BASELINE_TAG,
  HASH_TAG,
  INDEX_TAG,
  METRIC_TAG,
  PARENT_TAG,
  POINT_TAG,
  ROLE_TAG,
  SEED_TAG,
  SWEEP_TAG,
  VARIANT_TAG,
)
from core.paths import REPO_ROOT
from core.tracking import schema
from core.tracking.store import public_uri
from core.train import tracking as train_tracking
from core.train import workdir_lock
from launch import parent_watch
from launch import sweep as sweep_lib

STATE_FILE = schema.SWEEP_STATE_FILE
TRAINER_RUN_FILE = schema.RUN_FILE  # the run a workdir continues (core.train.tracking)
EXPERIMENT_BINDING = "core.train.loop.train.experiment"
ENV_TAG_PREFIX = schema.ENV
# What a worker's environment sets that can change numerics or placement.
ENV_VARS = (
  "XLA_FLAGS",
  "CUDA_VISIBLE_DEVICES",
  "XLA_PYTHON_CLIENT_MEM_FRACTION",
  "JAX_PLATFORMS",
  "OMP_NUM_THREADS",
  "MKL_NUM_THREADS",
  "OPENBLAS_NUM_THREADS",
)
CPU_COUNT_TAG = schema.CPUS  # cores a pinned worker had

TRAIN_COMMAND = (sys.executable, "-m", "launch.cli", "train")


@dataclasses.dataclass
class Outcome:
  point: sweep_lib.Point
  status: str  # FINISHED (ran now), SKIPPED (finished before), FAILED
  seconds: float = 0.0
  returncode: int | None = None
  log: str | None = None


# ------------------------------------------------------------- worker budget


def visible_gpus(env: dict[str, str] | None = None) -> list[str]:
  """GPU ids this process may use: CUDA_VISIBLE_DEVICES, else those nvidia-smi lists."""
  env = os.environ if env is None else env
  if "CUDA_VISIBLE_DEVICES" in env:
    return [g for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() not in ("", "-1")]
  if env.get("JAX_PLATFORMS", "").strip() == "cpu" or shutil.which("nvidia-smi") is None:
    return []
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def available_cpus() -> list[int]:
  try:
    return sorted(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return list(range(os.cpu_count() or 1))


_THREAD_FLAGS = re.compile(r"--xla_cpu_multi_thread_eigen=\S+|intra_op_parallelism_threads=\S+")


def worker_env(
  slot: int,
  workers: int,
  base_env: dict[str, str] | None = None,
  cpus: Sequence[int] | None = None,
  gpus: Sequence[str] | None = None,
) -> tuple[dict[str, str], list[int]]:
  """Environment and CPU set of worker `slot` of `workers` sharing this machine.

  Returns:
    (env, cpus): cpus is empty when the worker is not pinned (one worker).
  """
  env = dict(os.environ if base_env is None else base_env)
  cpus = list(available_cpus() if cpus is None else cpus)
  gpus = list(visible_gpus(env) if gpus is None else gpus)
  env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
  if workers <= 1:
    return env, []
  per = max(1, len(cpus) // workers)
  start = (slot * per) % max(1, len(cpus))
  mine = cpus[start : start + per] or cpus[:per]
  # One thread per core: XLA's CPU backend otherwise sizes its Eigen pool to
  # every core of the machine in every worker, and N workers oversubscribe.
  flags = _THREAD_FLAGS.sub("", env.get("XLA_FLAGS", "")).split()
  flags += [
    f"--xla_cpu_multi_thread_eigen={'false' if per == 1 else 'true'}",
    f"intra_op_parallelism_threads={per}",
  ]
  env["XLA_FLAGS"] = " ".join(flags)
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    env[var] = str(per)
  if gpus:
    if len(gpus) >= workers:
      share = len(gpus) // workers
      env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[slot * share : (slot + 1) * share])
    else:
      # Several workers per GPU: split its memory instead of letting the first
      # process preallocate 75% of it.
      per_gpu = -(-workers // len(gpus))
      env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
      env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / per_gpu:.2f}"
  return env, mine


def machine_cpu_peak() -> float | None:
  """This machine's float32 matmul peak (FLOP/s), measured once for every worker of a sweep.

  Workers measuring their own peak while the others run get different, noisy
  figures, and their MFUs stop being comparable. None when the sweep trains on
  GPUs (their peak comes from the device table).
  """
  if visible_gpus():
    return None
  from core.train import throughput  # pylint: disable=g-import-not-at-top

  if os.environ.get(throughput.PEAK_ENV):
    return float(os.environ[throughput.PEAK_ENV])
  return throughput.measured_cpu_peak()


def worker_peak(machine_peak: float, cpus: Sequence[int]) -> float:
  """A pinned worker's share of the machine peak: its cores over all cores."""
  total = len(available_cpus())
  return machine_peak * (len(cpus) / total if cpus and total else 1.0)


def pin_command(cmd: Sequence[str], cpus: Sequence[int]) -> list[str]:
  """The command pinned to `cpus` with taskset where available (else unpinned)."""
  taskset = shutil.which("taskset")
  if not cpus or taskset is None:
    return list(cmd)
  return [taskset, "-c", ",".join(str(c) for c in cpus), *cmd]


# ------------------------------------------------------------------- MLflow


def client(tracking_uri: str):
  from mlflow.tracking import MlflowClient

  os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
  return MlflowClient(tracking_uri)


def ensure_experiment(tracking_uri: str, name: str) -> str:
  from core.tracking.store import TrackingStoreError  # pylint: disable=g-import-not-at-top
  from core.tracking.store import ensure_experiment as ensure  # pylint: disable=g-import-not-at-top

  try:
    return ensure(client(tracking_uri), tracking_uri, name)
  except TrackingStoreError as e:
    raise sweep_lib.SweepError(f"{e} (--experiment)") from None


def child_runs(tracking_uri: str, parent_run_id: str) -> list:
  """All runs nested under the parent, newest first."""
  c = client(tracking_uri)
  parent = c.get_run(parent_run_id)
  runs, token = [], None
  while True:
    page = c.search_runs(
      [parent.info.experiment_id],
      filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
      order_by=["attributes.start_time DESC"],
      page_token=token,
    )
    runs.extend(page)
    token = page.token
    if not token:
      return runs


def finished_points(tracking_uri: str, parent_run_id: str) -> dict[str, str]:
  """Point key -> run id of each point whose child run is FINISHED."""
  done = {}
  for run in child_runs(tracking_uri, parent_run_id):
    key = run.data.tags.get(POINT_TAG)
    if key and run.info.status == "FINISHED" and key not in done:
      done[key] = run.info.run_id
  return done


def running_points(points: Sequence[sweep_lib.Point], workdir: Path) -> dict[str, dict]:
  """Point key -> {'pid', 'host'} of each point whose workdir a trainer holds now."""
  running = {}
  for point in points:
    info = workdir_lock.holder(child_workdir(workdir, point))
    if info is not None:
      running[point.key] = info
  return running


# ------------------------------------------------------------ parent run


def open_parent(
  sweep: sweep_lib.Sweep, points: Sequence[sweep_lib.Point], tracking_uri: str, workdir: Path
) -> str:
  """Creates the sweep's parent run, or reopens the one recorded in `workdir`."""
  from mlflow.exceptions import MlflowException

  digest = sweep_lib.definition_hash(sweep)
  state_path = workdir / STATE_FILE
  c = client(tracking_uri)
  if state_path.is_file():
    state = json.loads(state_path.read_text())
    if state.get("hash") != digest:
      raise sweep_lib.SweepError(
        f"{workdir} holds another definition of sweep {state.get('name')!r} (the file or its "
        f"overrides changed); use another --workdir, or delete {workdir} to start over"
      )
    if public_uri(state.get("tracking_uri")) != public_uri(tracking_uri):
      raise sweep_lib.SweepError(
        f"{workdir} was run against {state.get('tracking_uri')}, not {tracking_uri}; pass "
        f"--tracking_uri {state.get('tracking_uri')} to resume it"
      )
    try:
      c.get_run(state["parent_run_id"])
      c.update_run(state["parent_run_id"], status="RUNNING")
      return state["parent_run_id"]
    except MlflowException:
      print(
        f"ablax sweep: parent run {state['parent_run_id']} is gone from {tracking_uri}; "
        f"starting a new one",
        file=sys.stderr,
      )
  experiment_id = ensure_experiment(tracking_uri, sweep.experiment_name)
  tags = {
    SWEEP_TAG: sweep.name,
    ROLE_TAG: "parent",
    HASH_TAG: digest,
    schema.SWEEP_FILE: sweep_lib.relative_to_repo(sweep.source or ""),
    BASELINE_TAG: sweep_lib.baseline_variant(sweep),
    METRIC_TAG: sweep.metric,
    schema.NOTE: _note(sweep, points),
  }
  tags.update(_record_tags())
  run = c.create_run(experiment_id, tags=tags, run_name=sweep.name)
  run_id = run.info.run_id
  from mlflow.entities import Param

  axes = sweep_lib.check_shape(sweep)
  params = [
    Param(schema.SWEEP_NAME_PARAM, sweep.name),
    Param(schema.SWEEP_POINTS_PARAM, str(len(points))),
    Param(schema.SWEEP_SEEDS_PARAM, json.dumps(list(sweep.seeds))),
    Param(schema.SWEEP_BASE_PARAM, json.dumps(list(sweep.base))[:6000]),
  ]
  params += [Param(f"{schema.AXIS_PARAM}{a.name}", json.dumps(list(a.labels))[:6000]) for a in axes]
  c.log_batch(run_id, params=params, synchronous=True)
  c.log_text(
    run_id,
    json.dumps(
      {**sweep_lib.definition(sweep), "points": [_point_record(p) for p in points]}, indent=2
    ),
    schema.SWEEP_ARTIFACT,
  )
  if sweep.source and Path(sweep.source).is_file():
    c.log_artifact(run_id, sweep.source, "sweep")
  workdir.mkdir(parents=True, exist_ok=True)
  state_path.write_text(
    json.dumps(
      {
        "name": sweep.name,
        "hash": digest,
        schema.TRACKING_URI_KEY: public_uri(tracking_uri),
        schema.PARENT_RUN_ID_KEY: run_id,
        schema.EXPERIMENT_KEY: sweep.experiment_name,
      },
      indent=2,
    )
  )
  return run_id


def _note(sweep: sweep_lib.Sweep, points: Sequence[sweep_lib.Point]) -> str:
  axes = ", ".join(f"{a.name} ({len(a.labels)})" for a in sweep_lib.check_shape(sweep))
  return (
    f"Sweep `{sweep.name}`: {len(points)} runs = axes {axes} x {len(sweep.seeds)} seeds. "
    f"Compare: `ablax compare --sweep {sweep.name}`."
  )


def _record_tags() -> dict[str, str]:
  """The launching checkout's code version (devices are the children's to record: touching
  them here would make this process hold GPU memory the children need)."""
  try:
    from core.tracking import record  # pylint: disable=g-import-not-at-top

    code = record.code_version(REPO_ROOT)
  except Exception:  # noqa: BLE001  a record is a courtesy, never a reason to fail
    return {}
  tags = {
    schema.GIT_COMMIT: str(code.get("commit")),
    schema.GIT_DIRTY: str(code.get("dirty")).lower(),
  }
  if code.get("commit"):
    tags[schema.MLFLOW_GIT_COMMIT] = code["commit"]
  return tags


def _point_record(point: sweep_lib.Point) -> dict:
  return {
    "key": point.key,
    "variant": point.variant,
    "seed": point.seed,
    "gin_files": list(point.gin_files),
    "gin_params": list(point.gin_params),
  }


def close_parent(tracking_uri: str, parent_run_id: str, status: str) -> None:
  client(tracking_uri).set_terminated(parent_run_id, status)


# --------------------------------------------------------------- children


def child_workdir(workdir: Path, point: sweep_lib.Point) -> Path:
  return workdir / point.key


def prepare_child(
  sweep: sweep_lib.Sweep,
  point: sweep_lib.Point,
  *,
  workdir: Path,
  tracking_uri: str,
  parent_run_id: str,
) -> str:
  """The point's MLflow run, created (nested, tagged, axis params logged) before it trains.

  The run id goes into the child's `run.json`, which the trainer reads to
  continue a run (core/train/tracking.py), so the child logs into this run.
  Creating it here gives every point its parent link, tags and axis params
  without the trainer knowing about sweeps, and a point whose process dies
  before its first step still shows up (not FINISHED, so it runs again).
  """
  from mlflow.entities import Param
  from mlflow.exceptions import MlflowException

  c = client(tracking_uri)
  run_file = child_workdir(workdir, point) / TRAINER_RUN_FILE
  if run_file.is_file():
    record = json.loads(run_file.read_text())
    if public_uri(record.get(schema.TRACKING_URI_KEY)) == public_uri(tracking_uri) and record.get(
      schema.RUN_ID_KEY
    ):
      try:
        c.get_run(record[schema.RUN_ID_KEY])
        return record[schema.RUN_ID_KEY]
      except MlflowException:
        pass  # the store lost it: start the point's record afresh
  experiment_id = ensure_experiment(tracking_uri, sweep.experiment_name)
  tags = {
    PARENT_TAG: parent_run_id,
    POINT_TAG: point.key,
    VARIANT_TAG: point.variant,
    SWEEP_TAG: sweep.name,
    ROLE_TAG: "child",
    SEED_TAG: str(point.seed),
    INDEX_TAG: str(point.index),
  }
  run = c.create_run(experiment_id, tags=tags, run_name=f"{sweep.name}/{point.key}")
  run_id = run.info.run_id
  c.log_batch(run_id, params=[Param(k, v) for k, v in point.params.items()], synchronous=True)
  train_tracking.write_run_file(run_file.parent, run_id, tracking_uri, sweep.experiment_name)
  return run_id


def child_command(
  point: sweep_lib.Point,
  sweep: sweep_lib.Sweep,
  *,
  workdir: Path,
  tracking_uri: str,
  prefix: Sequence[str] = TRAIN_COMMAND,
) -> list[str]:
  """`ablax train` for the point, in its own workdir, logging to the sweep's store."""
  cmd = list(prefix)
  for f in sweep_lib.resolve_files(point):
    cmd += ["--gin_file", f]
  # The experiment binding keeps the trainer from creating an experiment of
  # its own name (it resumes the run prepare_child created in this one).
  for p in (*point.gin_params, f"{EXPERIMENT_BINDING} = {sweep.experiment_name!r}"):
    cmd += ["--gin_param", p]
  cmd += ["--workdir", str(child_workdir(workdir, point)), "--tracking_uri", tracking_uri]
  return cmd


def record_env(
  tracking_uri: str, run_id: str, env: dict[str, str], cpus: Sequence[int] = ()
) -> None:
  """Tags the run with the thread, core and device settings its worker gave it.

  `ablax reproduce` applies them again: XLA's CPU thread pools follow the cores
  a process may use, and a different split of a reduction changes the last
  bits of the loss.
  """
  c = client(tracking_uri)
  for var in ENV_VARS:
    if env.get(var):
      c.set_tag(run_id, f"{ENV_TAG_PREFIX}{var}", env[var])
  if cpus:
    c.set_tag(run_id, CPU_COUNT_TAG, str(len(cpus)))


def settle_child(tracking_uri: str, run_id: str, returncode: int) -> str:
  """The child run's final status; a run its process left RUNNING is marked FAILED."""
  c = client(tracking_uri)
  status = c.get_run(run_id).info.status
  if status == "RUNNING":
    c.set_terminated(run_id, "FAILED")
    status = "FAILED"
  return status


def run_points(
  points: Sequence[sweep_lib.Point],
  commands: dict[str, list[str]],
  *,
  workers: int,
  log_dir: Path,
  on_done: Callable[[Outcome, int, int], None] | None = None,
  fail_fast: bool = False,
  settle: Callable[[sweep_lib.Point, int], str] | None = None,
  on_start: Callable[[sweep_lib.Point, dict, list], None] | None = None,
  cpu_peak: float | None = None,
) -> list[Outcome]:
  """Runs the commands with `workers` at a time; returns outcomes in point order.

  `settle(point, returncode)` gives the point's final status (default:
  FINISHED when the process exited 0); the trainer exits 0 after a SIGTERM
  too, so the sweep asks MLflow instead.

  With fail_fast, no new point starts after one failed (running ones finish).
  Ctrl-C (or SIGTERM of the sweep) forwards SIGTERM to the running children,
  which save a checkpoint and exit; the next `ablax sweep` resumes them.
  `cpu_peak` (machine_cpu_peak) is handed to each child as its share, so every
  point's MFU divides by the same measurement.
  """
  log_dir.mkdir(parents=True, exist_ok=True)
  pending = list(points)
  outcomes: dict[int, Outcome] = {}
  lock = threading.Lock()
  procs: dict[int, subprocess.Popen] = {}
  stop = threading.Event()
  total = len(points)

  def worker(slot: int) -> None:
    env, cpus = worker_env(slot, workers)
    env[parent_watch.ENV] = str(os.getpid())  # the child stops when this process is gone
    if cpu_peak:
      from core.train.throughput import PEAK_ENV  # pylint: disable=g-import-not-at-top

      env[PEAK_ENV] = repr(worker_peak(cpu_peak, cpus))
    while not stop.is_set():
      with lock:
        if not pending:
          return
        point = pending.pop(0)
      log = log_dir / f"{point.key}.log"
      start = time.monotonic()
      with open(log, "ab") as out:
        cmd = pin_command(commands[point.key], cpus)
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        if on_start:
          on_start(point, env, cpus)
        # No preexec_fn: it forces a plain fork of this (JAX-importing, threaded) process.
        proc = subprocess.Popen(
          cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        with lock:
          procs[point.index] = proc
        rc = proc.wait()
        with lock:
          procs.pop(point.index, None)
      try:
        status = settle(point, rc) if settle else ("FINISHED" if rc == 0 else "FAILED")
      except Exception as e:  # noqa: BLE001  one unreadable status must not stop the others
        status = f"FAILED ({type(e).__name__}: {e})"
      outcome = Outcome(point, status, time.monotonic() - start, rc, str(log))
      with lock:
        outcomes[point.index] = outcome
        if fail_fast and outcome.status != "FINISHED":
          stop.set()
        if on_done:
          on_done(outcome, len(outcomes), total)

  threads = [
    threading.Thread(target=worker, args=(i,), daemon=True)
    for i in range(max(1, min(workers, len(points))))
  ]
  for t in threads:
    t.start()
  try:
    for t in threads:
      while t.is_alive():
        t.join(0.5)
  except KeyboardInterrupt:
    stop.set()
    with lock:
      running = list(procs.values())
    for proc in running:
      proc.terminate()
    for proc in running:
      try:
        proc.wait(120)
      except subprocess.TimeoutExpired:
        proc.kill()
    raise
  return [outcomes[p.index] for p in points if p.index in outcomes]
