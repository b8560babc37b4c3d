"""Running a sweep as a SLURM job array: one array task per sweep point.

ablax does not schedule anything on a cluster; it writes an sbatch script and
lets SLURM run it. The script is self-contained (SLURM copies it at submission,
so later edits of the checkout do not change a queued sweep): a `case` on
`$SLURM_ARRAY_TASK_ID` picks the point's command, which is the same `ablax
train` child command the local runner starts (launch/sweep_runner.py), so a
point trained on the cluster logs to the same MLflow parent run and resumes
the same way. The array lists only the points that are not finished yet.

Resources come from `SlurmResources`, bound in gin (the sweep file or a
cluster file, e.g. `launch.slurm.SlurmResources.partition = 'gpu'` after
`import launch.slurm`) and overridden by `--slurm_*` flags. A point that spans
several processes (`nodes` > 1 or `ntasks_per_node` > 1) runs under `srun`,
where `ablax train` finds its coordinator and process id in the SLURM step
environment (launch/distributed.py).

`job_states` reports each task from squeue while it is queued or running,
then from sacct, or from `scontrol show job` where accounting is off.
launch/slurm_sweep.py submits sweeps with this and records the job ids.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from core.tracking import schema

JOB_IDS_TAG = schema.SLURM_JOB_IDS
ARRAY_TAG = schema.SLURM_ARRAY
SCRIPT_TAG = schema.SLURM_SCRIPT
STATE_FILE = "slurm.json"

# SLURM states after which a task will not run again by itself.
DONE_STATES = frozenset(
  {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "REVOKED",
    "SPECIAL_EXIT",
  }
)


class SlurmError(RuntimeError):
  """sbatch/squeue/sacct failed or are missing; the message carries their stderr."""


@dataclasses.dataclass
class SlurmResources:
  """What each array task (one sweep point) asks SLURM for.

  Attributes:
    partition: `--partition`; None uses the cluster's default.
    nodes: hosts per point; > 1 makes the point one multi-host run under srun.
    ntasks_per_node: processes per host (e.g. one per GPU); > 1 also uses srun.
    gpus_per_node: `--gpus-per-node` (all GPUs of a host for its processes).
    gpus_per_task: `--gpus-per-task` (SLURM then binds GPUs per process).
    cpus_per_task: `--cpus-per-task`.
    mem: `--mem` per node, e.g. '64G'.
    time: `--time` limit, e.g. '04:00:00' or '1-00:00:00'.
    account, qos, constraint: the options of the same names.
    max_parallel: at most this many points at once (`--array=...%N`).
    job_name: default: 'ablax-<sweep name>'.
    setup: shell lines run before the point's command (module loads, venv).
    sbatch_options: further raw options, e.g. ['--exclusive', '--reservation=r'].
    signal_seconds: send SIGTERM this long before the time limit, so the
      trainer checkpoints and exits; a re-submitted sweep resumes the point.
  """

  partition: str | None = None
  nodes: int = 1
  ntasks_per_node: int = 1
  gpus_per_node: int | None = None
  gpus_per_task: int | None = None
  cpus_per_task: int | None = None
  mem: str | None = None
  time: str | None = None
  account: str | None = None
  qos: str | None = None
  constraint: str | None = None
  max_parallel: int | None = None
  job_name: str | None = None
  setup: Sequence[str] = ()
  sbatch_options: Sequence[str] = ()
  signal_seconds: int | None = 120

  @property
  def multi_process(self) -> bool:
    return self.nodes > 1 or self.ntasks_per_node > 1

  def check(self) -> None:
    for name in ("nodes", "ntasks_per_node"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"SlurmResources.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("gpus_per_node", "gpus_per_task", "cpus_per_task", "max_parallel"):
      value = getattr(self, name)
      if value is not None and int(value) < 1:
        raise ValueError(f"SlurmResources.{name} must be >= 1, got {value}")
    if self.time is not None and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", str(self.time)):
      raise ValueError(f"SlurmResources.time {self.time!r}: use minutes, H:MM:SS or D-HH:MM:SS")
    if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", str(self.mem)):
      raise ValueError(f"SlurmResources.mem {self.mem!r}: use e.g. 64G or 4000M")


def load_resources(gin_files: Sequence[str] = (), gin_params: Sequence[str] = ()) -> SlurmResources:
  """`SlurmResources` as bound in gin files (a sweep file, a cluster file); defaults if unbound.

  Leaves gin's global configuration clean, like `launch.sweep.load`.
  """
  import gin
  from launch import gin_config

  if not gin_files and not gin_params:
    return SlurmResources()
  gin.clear_config()
  try:
    gin_config.parse(gin_files, gin_params, finalize=False)
    try:
      configurable = gin.get_configurable(SlurmResources)
    except ValueError:
      # Dynamic registration registers a class only when a file binds it:
      # files that never mention SlurmResources leave the defaults.
      return SlurmResources()
    return configurable()
  finally:
    gin.clear_config()


# flag -> (SlurmResources field, type)
_FLAGS = {
  "slurm_partition": ("partition", str),
  "slurm_nodes": ("nodes", int),
  "slurm_ntasks_per_node": ("ntasks_per_node", int),
  "slurm_gpus_per_node": ("gpus_per_node", int),
  "slurm_gpus_per_task": ("gpus_per_task", int),
  "slurm_cpus_per_task": ("cpus_per_task", int),
  "slurm_mem": ("mem", str),
  "slurm_time": ("time", str),
  "slurm_account": ("account", str),
  "slurm_qos": ("qos", str),
  "slurm_constraint": ("constraint", str),
  "slurm_max_parallel": ("max_parallel", int),
  "slurm_job_name": ("job_name", str),
}


def add_arguments(parser: Any) -> None:
  """The `--slurm_*` flags (each overrides the gin binding of the same field)."""
  group = parser.add_argument_group("SLURM (with --launcher slurm)")
  for flag, (field, kind) in _FLAGS.items():
    group.add_argument(f"--{flag}", type=kind, default=None, help=f"SlurmResources.{field}")
  group.add_argument(
    "--slurm_gin",
    action="append",
    default=[],
    help="gin file binding launch.slurm.SlurmResources (repeatable)",
  )
  group.add_argument(
    "--slurm_setup",
    action="append",
    default=[],
    help="shell line run before each point, e.g. 'module load cuda' (repeatable)",
  )
  group.add_argument(
    "--slurm_option",
    action="append",
    default=[],
    help="raw sbatch option, e.g. --slurm_option=--exclusive (repeatable)",
  )


def resources_from_args(args: Any, base: SlurmResources | None = None) -> SlurmResources:
  """`base` (from gin) with every `--slurm_*` flag that was given applied on top."""
  resources = dataclasses.replace(base or SlurmResources())
  for flag, (field, _) in _FLAGS.items():
    value = getattr(args, flag, None)
    if value is not None:
      setattr(resources, field, value)
  resources.setup = tuple(resources.setup) + tuple(getattr(args, "slurm_setup", None) or ())
  resources.sbatch_options = tuple(resources.sbatch_options) + tuple(
    getattr(args, "slurm_option", None) or ()
  )
  resources.check()
  return resources


# ------------------------------------------------------------ the script


def format_indices(indices: Iterable[int]) -> str:
  """Array indices in SLURM's compact form: [0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
  values = sorted(set(int(i) for i in indices))
  if not values:
    raise ValueError("no array indices")
  parts, start, prev = [], values[0], values[0]
  for v in values[1:] + [None]:
    if v is not None and v == prev + 1:
      prev = v
      continue
    parts.append(str(start) if start == prev else f"{start}-{prev}")
    if v is not None:
      start = prev = v
  return ",".join(parts)


def sbatch_directives(
  resources: SlurmResources,
  *,
  job_name: str,
  indices: Sequence[int],
  log_dir: Path,
  chdir: Path | None,
) -> list[str]:
  r = resources
  array = format_indices(indices) + (f"%{r.max_parallel}" if r.max_parallel else "")
  lines = [
    f"--job-name={r.job_name or job_name}",
    f"--array={array}",
    f"--output={log_dir}/%x-%A_%a.log",
    f"--nodes={r.nodes}",
    f"--ntasks-per-node={r.ntasks_per_node}",
  ]
  if chdir is not None:
    lines.append(f"--chdir={chdir}")
  optional = [
    ("partition", "--partition"),
    ("gpus_per_node", "--gpus-per-node"),
    ("gpus_per_task", "--gpus-per-task"),
    ("cpus_per_task", "--cpus-per-task"),
    ("mem", "--mem"),
    ("time", "--time"),
    ("account", "--account"),
    ("qos", "--qos"),
    ("constraint", "--constraint"),
  ]
  lines += [f"{flag}={getattr(r, name)}" for name, flag in optional if getattr(r, name) is not None]
  if r.signal_seconds:
    # B: signal the batch shell, which forwards it to the running command.
    lines.append(f"--signal=B:TERM@{int(r.signal_seconds)}")
  lines += list(r.sbatch_options)
  for line in lines:
    if "\n" in line:
      raise ValueError(f"sbatch option with a newline: {line!r}")
  return lines


def render_array_script(
  commands: Mapping[int, Sequence[str]],
  resources: SlurmResources,
  *,
  job_name: str,
  log_dir: str | os.PathLike,
  chdir: str | os.PathLike | None = None,
  env: Mapping[str, str] | None = None,
  labels: Mapping[int, str] | None = None,
) -> str:
  """An sbatch script running `commands[i]` as array task i.

  Args:
    commands: array index -> argv; only these indices are in the array.
    resources: per-task resources.
    job_name: default job name (`resources.job_name` wins).
    log_dir: where SLURM writes each task's output (`%x-%A_%a.log`).
    chdir: working directory of the tasks (default: where sbatch runs).
    env: variables exported before the command (e.g. MLFLOW_TRACKING_URI).
    labels: index -> a human-readable name written as a comment per case.
  """
  resources.check()
  if not commands:
    raise ValueError("no commands to submit")
  log_dir = Path(log_dir)
  lines = ["#!/bin/bash", f"# ablax sweep as a SLURM job array ({len(commands)} tasks)."]
  lines += [
    f"#SBATCH {d}"
    for d in sbatch_directives(
      resources,
      job_name=job_name,
      indices=list(commands),
      log_dir=log_dir,
      chdir=Path(chdir) if chdir is not None else None,
    )
  ]
  lines += ["", "set -eo pipefail"]
  for key, value in (env or {}).items():
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      raise ValueError(f"bad environment variable name {key!r}")
    lines.append(f"export {key}={shlex.quote(str(value))}")
  lines += list(resources.setup)
  # Only now: `module load` (Lmod) and old venv activate scripts read unset variables.
  lines.append("set -u")
  launcher = ""
  if resources.multi_process:
    # One process per task; a failing process ends the step instead of leaving
    # its peers waiting on collectives until the time limit.
    launcher = "srun --kill-on-bad-exit=1 "
  lines += [
    "",
    'echo "ablax: array task ${SLURM_ARRAY_TASK_ID} of job ${SLURM_ARRAY_JOB_ID} on $(hostname)"',
    'case "${SLURM_ARRAY_TASK_ID}" in',
  ]
  for index in sorted(commands):
    if labels and index in labels:
      lines.append(f"  # {_one_line(labels[index])}")
    # Not `exec`: the batch shell stays to forward the time-limit SIGTERM
    # (--signal=B:...) to the command, which runs in the background below.
    lines.append(f"  {int(index)}) cmd=({launcher}{shlex.join(commands[index])}) ;;")
  lines += [
    '  *) echo "ablax: no command for array task ${SLURM_ARRAY_TASK_ID}" >&2; exit 2 ;;',
    "esac",
    "",
    '"${cmd[@]}" &',
    "child=$!",
    "trap 'terminated=1; kill -TERM \"$child\" 2>/dev/null' TERM",
    "status=0",
    'wait "$child" || status=$?',
    "# The first wait returns early when the trap fires; the second gets the",
    "# command's own exit status once it has saved its checkpoint.",
    'if [ -n "${terminated:-}" ]; then status=0; wait "$child" || status=$?; fi',
    'exit "$status"',
    "",
  ]
  return "\n".join(lines)


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


# -------------------------------------------------------------- commands


def _run(argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess:
  try:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
  except FileNotFoundError:
    raise SlurmError(
      f"{argv[0]} not found: run on a SLURM login node (or install slurm-client)"
    ) from None
  except subprocess.TimeoutExpired:
    raise SlurmError(f"{argv[0]} did not answer within {timeout:.0f}s") from None


def submit(script_path: str | os.PathLike, *, sbatch: str = "sbatch") -> str:
  """Submits the script; returns the job id (`sbatch --parsable` prints 'id[;cluster]')."""
  proc = _run([sbatch, "--parsable", str(script_path)])
  if proc.returncode != 0:
    raise SlurmError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}")
  out = proc.stdout.strip().splitlines()
  if not out or not re.fullmatch(r"\d+(;\S+)?", out[-1]):
    raise SlurmError(f"sbatch printed no job id: {proc.stdout!r}")
  return out[-1].split(";")[0]


def cancel(job_ids: Sequence[str], *, scancel: str = "scancel") -> None:
  proc = _run([scancel, *job_ids])
  if proc.returncode != 0:
    raise SlurmError(f"scancel failed: {proc.stderr.strip()}")


@dataclasses.dataclass(frozen=True)
class TaskState:
  job_id: str  # the array job id
  index: int  # the array task index (= sweep point index)
  state: str  # SLURM state, e.g. PENDING, RUNNING, COMPLETED, FAILED
  exit_code: str = ""
  reason: str = ""

  @property
  def done(self) -> bool:
    return self.state in DONE_STATES


def _state_word(state: str) -> str:
  # sacct writes e.g. 'CANCELLED by 1000'; squeue/scontrol a bare word.
  return state.split()[0].rstrip("+") if state.strip() else "UNKNOWN"


def _indices(spec: str) -> list[int]:
  """'3', '[2-5%2]', '0,4-6' -> indices."""
  spec = spec.strip("[]").split("%")[0]
  out = []
  for part in filter(None, spec.split(",")):
    lo, _, hi = part.partition("-")
    out.extend(range(int(lo), int(hi or lo) + 1))
  return out


def parse_squeue(text: str) -> list[TaskState]:
  """`squeue -h -r -o '%i|%T|%r'` lines (array tasks look like '12_3' or '12_[4-7%2]')."""
  tasks = []
  for line in text.splitlines():
    if not line.strip():
      continue
    job, state, reason = (line.split("|") + ["", ""])[:3]
    if "_" not in job:
      continue
    array_id, spec = job.split("_", 1)
    tasks += [
      TaskState(array_id, i, _state_word(state), "", reason.strip()) for i in _indices(spec)
    ]
  return tasks


def parse_sacct(text: str) -> list[TaskState]:
  """`sacct -n -P -X -o JobID,State,ExitCode` lines."""
  tasks = []
  for line in text.splitlines():
    parts = line.split("|")
    if len(parts) < 3 or "_" not in parts[0]:
      continue
    array_id, spec = parts[0].split("_", 1)
    tasks += [
      TaskState(array_id, i, _state_word(parts[1]), parts[2].strip()) for i in _indices(spec)
    ]
  return tasks


def parse_scontrol(text: str) -> list[TaskState]:
  """`scontrol show job -o ID` lines: one per task (or per pending range)."""
  tasks = []
  for line in text.splitlines():
    fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
    if "ArrayJobId" not in fields or "ArrayTaskId" not in fields:
      continue
    tasks += [
      TaskState(
        fields["ArrayJobId"],
        i,
        _state_word(fields.get("JobState", "")),
        fields.get("ExitCode", ""),
        fields.get("Reason", ""),
      )
      for i in _indices(fields["ArrayTaskId"])
    ]
  return tasks


def job_states(job_ids: Sequence[str]) -> dict[tuple[str, int], TaskState]:
  """(array job id, index) -> the latest state SLURM reports, queued or finished."""
  if not job_ids:
    return {}
  states: dict[tuple[str, int], TaskState] = {}
  ids = ",".join(job_ids)
  acct = _run(["sacct", "-n", "-P", "-X", "-j", ids, "-o", "JobID,State,ExitCode"])
  if acct.returncode == 0:
    found = parse_sacct(acct.stdout)
  else:
    # No accounting (no slurmdbd): scontrol remembers jobs for MinJobAge seconds.
    found = []
    for job in job_ids:
      proc = _run(["scontrol", "show", "job", "-o", job])
      if proc.returncode == 0:
        found += parse_scontrol(proc.stdout)
  for task in found:
    states[(task.job_id, task.index)] = task
  queue = _run(["squeue", "-h", "-r", "-j", ids, "-o", "%i|%T|%r"])
  if queue.returncode == 0:
    # squeue is the freshest view of queued and running tasks.
    for task in parse_squeue(queue.stdout):
      states[(task.job_id, task.index)] = task
  elif "invalid job id" not in queue.stderr.lower():
    # 'Invalid job id' only means none of the jobs is queued any more; jobs
    # that ended long ago (past MinJobAge, without accounting) are simply absent.
    raise SlurmError(f"squeue failed ({queue.returncode}): {queue.stderr.strip()}")
  return states


def wait(
  job_ids: Sequence[str], *, timeout_s: float = 3600, poll_s: float = 2.0
) -> dict[tuple[str, int], TaskState]:
  """Polls until every task of the jobs is done; returns their final states."""
  deadline = time.monotonic() + timeout_s
  while True:
    states = job_states(job_ids)
    if states and all(t.done for t in states.values()):
      return states
    if time.monotonic() > deadline:
      raise SlurmError(
        f"jobs {','.join(job_ids)} not done after {timeout_s:.0f}s: "
        + ", ".join(f"{k[0]}_{k[1]}={t.state}" for k, t in sorted(states.items()))
      )
    time.sleep(poll_s)
