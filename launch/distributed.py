"""Who am I in a multi-process run: coordinator, process count and process id.

`ablax train` on several hosts uses JAX's multi-controller runtime: every
process calls `jax.distributed.initialize(coordinator_address, num_processes,
process_id)` before touching a device. This module decides those three values,
from (first wins, field by field):

1. the command-line flags `--coordinator_address`, `--num_processes`,
   `--process_id`;
2. the environment: `ABLAX_COORDINATOR` (host:port), `ABLAX_NUM_PROCESSES`,
   `ABLAX_PROCESS_ID`, or `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
   `JAX_PROCESS_ID`;
3. SLURM, inside a job step started by `srun`: `SLURM_PROCID`,
   `SLURM_STEP_NUM_TASKS` (or `SLURM_NTASKS`), and the first host of
   `SLURM_STEP_NODELIST` (or `SLURM_JOB_NODELIST`), with a port from
   `ABLAX_COORDINATOR_PORT` / `JAX_COORDINATOR_PORT` or derived from the job id.

TPU VMs (and GKE TPU pods) publish their topology in the GCE metadata server,
which only JAX's own detection reads; `ABLAX_DISTRIBUTED=auto` (set by
`ablax launch tpu-vm`) or a GKE TPU environment asks for that detection, i.e.
`jax.distributed.initialize()` with no arguments. `ABLAX_DISTRIBUTED=off`
forces a single-process run.

We resolve SLURM ourselves rather than leaving it to JAX because JAX's SLURM
detection also pins each process to one GPU (`local_device_ids=[SLURM_LOCALID]`),
which hides all but one GPU when a node runs one task over all its GPUs, and is
wrong when SLURM already bound GPUs per task (`--gpus-per-task` sets
CUDA_VISIBLE_DEVICES). Once we have all three values we switch JAX's detection
off; `ABLAX_LOCAL_DEVICE_IDS` restricts devices explicitly when wanted.

Process 0's coordinator service listens on the coordinator address only (JAX
would listen on every interface, `[::]:port`): on loopback when the address is
a loopback one, which a SLURM step on a single node uses. `JAX_COORDINATOR_BIND_ADDRESS`
still overrides it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
from typing import Any, Callable, Iterator, Mapping

from core.errors import UserError

logger = logging.getLogger(__name__)

ENV_MODE = "ABLAX_DISTRIBUTED"
ENV_COORDINATOR = "ABLAX_COORDINATOR"
ENV_NUM_PROCESSES = "ABLAX_NUM_PROCESSES"
ENV_PROCESS_ID = "ABLAX_PROCESS_ID"
ENV_PORT = "ABLAX_COORDINATOR_PORT"
ENV_LOCAL_DEVICE_IDS = "ABLAX_LOCAL_DEVICE_IDS"

# Same range JAX uses for SLURM: the top 4096 ports, clear of most services.
_PORT_BASE, _PORT_SPAN = 65536 - 4096, 4096
# JAX's own variable for the coordinator's listening address; it wins over ours.
BIND_ENV = "JAX_COORDINATOR_BIND_ADDRESS"
_MODES = ("", "auto", "off")


class DistributedConfigError(UserError, ValueError):
  """The flags and environment do not describe a usable multi-process run."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Arguments for `jax.distributed.initialize`; iterates as the first three.

  `source` says where the values came from ('flags', 'env', 'slurm', or
  'auto' when JAX detects everything itself, in which case the three values
  are None).
  """

  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  local_device_ids: tuple[int, ...] | None = None
  source: str = "flags"

  def __iter__(self) -> Iterator[Any]:
    return iter((self.coordinator_address, self.num_processes, self.process_id))

  @property
  def is_primary(self) -> bool:
    """Process 0: the one that writes tracking records and the run directory.

    Unknown before initialization under 'auto'; use `jax.process_index()` then.
    """
    return self.process_id == 0

  def initialize_kwargs(self) -> dict[str, Any]:
    if self.source == "auto":
      return {}
    kwargs: dict[str, Any] = dict(
      coordinator_address=self.coordinator_address,
      num_processes=self.num_processes,
      process_id=self.process_id,
    )
    if self.local_device_ids is not None:
      kwargs["local_device_ids"] = list(self.local_device_ids)
    # Everything is decided: keep JAX's own cluster detection from overriding
    # the visible devices (see the module docstring).
    kwargs["cluster_detection_method"] = "deactivate"
    kwargs["coordinator_bind_address"] = os.environ.get(BIND_ENV) or bind_address(
      self.coordinator_address
    )
    return kwargs


def bind_address(coordinator_address: str) -> str:
  """Where process 0's coordinator service listens: the coordinator's own host and port.

  The other processes reach it at that address, so nothing else needs to be open;
  'localhost' becomes 127.0.0.1, as gRPC would otherwise listen on one of ::1 and
  127.0.0.1 while a client may try the other.
  """
  host, port = coordinator_address.rsplit(":", 1)
  if host.lower() == "localhost":
    host = "127.0.0.1"
  return f"{host}:{port}"


def expand_hostlist(hostlist: str) -> list[str]:
  """SLURM's compressed host list, expanded in order (`scontrol show hostnames`).

  'node[01-03,07],login' -> ['node01', 'node02', 'node03', 'node07', 'login'];
  several bracket groups in one name expand as a product ('r[1-2]n[1-2]').
  Zero padding follows the width of the range's lower bound, as SLURM does.
  """
  hosts: list[str] = []
  for item in _split_top_level(hostlist.strip()):
    if not item:
      continue
    parts: list[list[str]] = []
    for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", item):
      if literal:
        parts.append([literal])
      if ranges:
        parts.append(_expand_ranges(ranges, item))
    hosts.extend("".join(p) for p in itertools.product(*parts))
  return hosts


def _split_top_level(text: str) -> list[str]:
  items, depth, current = [], 0, []
  for ch in text:
    if ch == "[":
      depth += 1
    elif ch == "]":
      depth -= 1
      if depth < 0:
        raise DistributedConfigError(f"unbalanced ']' in SLURM host list {text!r}")
    if ch == "," and depth == 0:
      items.append("".join(current))
      current = []
    else:
      current.append(ch)
  if depth != 0:
    raise DistributedConfigError(f"unbalanced '[' in SLURM host list {text!r}")
  items.append("".join(current))
  return items


def _expand_ranges(ranges: str, item: str) -> list[str]:
  out = []
  for part in ranges.split(","):
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
    if not m:
      raise DistributedConfigError(f"bad range {part!r} in SLURM host list entry {item!r}")
    lo, hi = m.group(1), m.group(2) or m.group(1)
    if int(hi) < int(lo):
      raise DistributedConfigError(f"descending range {part!r} in SLURM host list entry {item!r}")
    out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
  return out


def slurm_port(environ: Mapping[str, str]) -> int:
  """A coordinator port every task of a job step agrees on without talking.

  Derived from the job id and step id so that two jobs sharing a node, or two
  steps of one job, do not collide on it.
  """
  job = int(environ.get("SLURM_JOB_ID", "0"))
  step = _int_or(environ.get("SLURM_STEP_ID"), 0)
  return _PORT_BASE + (job * 7 + step) % _PORT_SPAN


def resolve_distributed(
  args: Any = None, environ: Mapping[str, str] | None = None
) -> DistributedConfig | None:
  """The multi-process configuration of this process, or None for a single process.

  Args:
    args: parsed flags; `coordinator_address`, `num_processes`, `process_id`
      are read when present (missing attributes count as unset).
    environ: the environment (defaults to `os.environ`); tests pass literals.

  Raises:
    DistributedConfigError: partial or inconsistent settings, e.g. a process
      count without a coordinator, or a SLURM allocation of several tasks in a
      process that `srun` did not start.
  """
  env = os.environ if environ is None else environ
  mode = env.get(ENV_MODE, "").strip().lower()
  if mode not in _MODES:
    raise DistributedConfigError(f"{ENV_MODE}={env[ENV_MODE]!r}: expected 'auto' or 'off'")

  flags = {
    "coordinator_address": _flag(args, "coordinator_address"),
    "num_processes": _flag(args, "num_processes"),
    "process_id": _flag(args, "process_id"),
  }
  from_env = {
    "coordinator_address": env.get(ENV_COORDINATOR) or env.get("JAX_COORDINATOR_ADDRESS"),
    "num_processes": _first_int_env(env, ENV_NUM_PROCESSES, "JAX_NUM_PROCESSES"),
    "process_id": _first_int_env(env, ENV_PROCESS_ID, "JAX_PROCESS_ID"),
  }
  if mode == "off":
    if any(v is not None for v in flags.values()):
      raise DistributedConfigError(f"{ENV_MODE}=off contradicts the distributed flags given")
    return None
  explicit = all(flags[k] is not None or from_env[k] is not None for k in flags)
  # SLURM is read only when needed: its batch-step check must not block a run
  # whose flags already say everything.
  slurm = None if explicit else _from_slurm(env)

  values: dict[str, Any] = {}
  sources: list[str] = []
  for key in flags:
    for source, candidates in (("flags", flags), ("env", from_env), ("slurm", slurm or {})):
      if candidates.get(key) is not None:
        values[key] = candidates[key]
        sources.append(source)
        break
    else:
      values[key] = None

  local_ids = _local_device_ids(env)
  if all(v is None for v in values.values()):
    if mode == "auto" or _gke_tpu(env):
      return DistributedConfig(None, None, None, local_ids, source="auto")
    return None

  source = min(sources, key=["flags", "env", "slurm"].index)
  missing = [k for k, v in values.items() if v is None]
  if missing == ["coordinator_address"] and values["num_processes"] == 1:
    return None
  if missing:
    raise DistributedConfigError(
      f"incomplete multi-process settings: {', '.join(missing)} not set (got "
      + ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)
      + f"); pass --{missing[0]} or set {_ENV_FOR[missing[0]]}, or run under srun"
    )
  num, pid = int(values["num_processes"]), int(values["process_id"])
  if num < 1 or not 0 <= pid < num:
    raise DistributedConfigError(f"process_id {pid} is not in [0, num_processes={num})")
  if num == 1:
    return None
  coordinator = str(values["coordinator_address"])
  if not re.fullmatch(r"\S+:\d+", coordinator):
    raise DistributedConfigError(f"coordinator address {coordinator!r} is not host:port")
  return DistributedConfig(coordinator, num, pid, local_ids, source=source)


_ENV_FOR = {
  "coordinator_address": ENV_COORDINATOR,
  "num_processes": ENV_NUM_PROCESSES,
  "process_id": ENV_PROCESS_ID,
}


def _from_slurm(env: Mapping[str, str]) -> dict[str, Any] | None:
  """Values from a SLURM job step, None outside SLURM.

  In the batch script itself (before `srun`) SLURM_NTASKS counts the tasks the
  job may start, but only one process runs: starting a multi-process run there
  would wait for peers forever, so it is an error with the fix in the message.
  """
  if "SLURM_JOB_ID" not in env or "SLURM_PROCID" not in env:
    return None
  in_step = "SLURM_STEP_NODELIST" in env or "SLURM_STEP_ID" in env
  count = env.get("SLURM_STEP_NUM_TASKS") if in_step else None
  count = _int_or(count or env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS"), 1)
  if count <= 1:
    return {"num_processes": 1, "process_id": 0}
  if not in_step:
    raise DistributedConfigError(
      f"SLURM job {env['SLURM_JOB_ID']} has {count} tasks but this process was not started "
      "by srun; start one process per task with `srun ablax train ...`"
    )
  nodelist = (
    env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
  )
  if not nodelist:
    raise DistributedConfigError("SLURM step without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST")
  hosts = expand_hostlist(nodelist)
  if not hosts:
    raise DistributedConfigError(f"empty SLURM host list {nodelist!r}")
  port = _int_env(env, ENV_PORT) or _int_env(env, "JAX_COORDINATOR_PORT") or slurm_port(env)
  # Every task of a one-node step is on this machine: the coordinator needs no network.
  host = "127.0.0.1" if len(set(hosts)) == 1 else hosts[0]
  return {
    "coordinator_address": f"{host}:{port}",
    "num_processes": count,
    "process_id": int(env["SLURM_PROCID"]),
  }


def _gke_tpu(env: Mapping[str, str]) -> bool:
  # GKE TPU pods name their workers in the environment; JAX reads them itself.
  return bool(
    env.get("TPU_WORKER_HOSTNAMES")
    or env.get("TPU_PROCESS_ADDRESSES")
    or env.get("MEGASCALE_COORDINATOR_ADDRESS")
  )


def _local_device_ids(env: Mapping[str, str]) -> tuple[int, ...] | None:
  raw = env.get(ENV_LOCAL_DEVICE_IDS, "").strip()
  if not raw:
    return None
  try:
    return tuple(int(x) for x in raw.split(","))
  except ValueError:
    raise DistributedConfigError(
      f"{ENV_LOCAL_DEVICE_IDS}={raw!r}: expected comma-separated integers"
    ) from None


def _flag(args: Any, name: str) -> Any:
  value = getattr(args, name, None) if args is not None else None
  return None if value in (None, "") else value


def _int_env(env: Mapping[str, str], name: str) -> int | None:
  raw = env.get(name)
  if raw is None or raw.strip() == "":
    return None
  try:
    return int(raw)
  except ValueError:
    raise DistributedConfigError(f"{name}={raw!r} is not an integer") from None


def _first_int_env(env: Mapping[str, str], *names: str) -> int | None:
  for name in names:
    value = _int_env(env, name)
    if value is not None:
      return value
  return None


def _int_or(raw: str | None, default: int) -> int:
  try:
    return int(raw) if raw not in (None, "") else default
  except ValueError:
    return default


def initialize(config: DistributedConfig | None) -> bool:
  """Starts JAX's multi-controller runtime for `config`; False for a single process.

  Must run before any JAX computation or device query in the process.
  """
  if config is None:
    return False
  import jax

  logger.info(
    "jax.distributed.initialize via %s: %s",
    config.source,
    config.initialize_kwargs() or "(detected by JAX)",
  )
  jax.distributed.initialize(**config.initialize_kwargs())
  return True


def initialize_from(
  args: Any = None,
  environ: Mapping[str, str] | None = None,
  *,
  detected: Callable[[], bool] | None = None,
) -> DistributedConfig | None:
  """`resolve_distributed`, then JAX's own detection, then `initialize`; the config used.

  Args:
    args, environ: as for `resolve_distributed`.
    detected: says whether JAX would detect a cluster this module does not
      resolve itself (Open MPI, a Cloud TPU VM); if so, and nothing was
      resolved and `ABLAX_DISTRIBUTED` is not 'off', JAX detects everything.
  """
  env = os.environ if environ is None else environ
  config = resolve_distributed(args, env)
  if (
    config is None
    and detected is not None
    and env.get(ENV_MODE, "").strip().lower() != "off"
    and not _from_slurm_single(env)
    and detected()
  ):
    config = DistributedConfig(None, None, None, _local_device_ids(env), source="auto")
  initialize(config)
  return config


def _from_slurm_single(env: Mapping[str, str]) -> bool:
  # A one-task SLURM step needs no runtime; JAX would still start one for it.
  return "SLURM_JOB_ID" in env and "SLURM_PROCID" in env
