"""Multi-process settings resolved from literal flags and environments (no SLURM needed)."""

import argparse

import pytest

from launch.distributed import (
  DistributedConfig,
  DistributedConfigError,
  expand_hostlist,
  resolve_distributed,
  slurm_port,
)

# What `srun --ntasks=4 --nodes=2` exports to task 3 (the variables we read).
SLURM_STEP = {
  "SLURM_JOB_ID": "4242",
  "SLURM_STEP_ID": "0",
  "SLURM_PROCID": "3",
  "SLURM_LOCALID": "1",
  "SLURM_NTASKS": "4",
  "SLURM_STEP_NUM_TASKS": "4",
  "SLURM_JOB_NODELIST": "gpu[07-08]",
  "SLURM_STEP_NODELIST": "gpu[07-08]",
}


def _args(**kw):
  return argparse.Namespace(
    **{"coordinator_address": None, "num_processes": None, "process_id": None, **kw}
  )


@pytest.mark.parametrize(
  "hostlist,expected",
  [
    ("node001", ["node001"]),
    ("node001,host2", ["node001", "host2"]),
    ("node[001-003],host2", ["node001", "node002", "node003", "host2"]),
    ("node[001,007-008]", ["node001", "node007", "node008"]),
    ("gpu-a[9-11]-ib", ["gpu-a9-ib", "gpu-a10-ib", "gpu-a11-ib"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
    ("a[1-2],b,c[3]", ["a1", "a2", "b", "c3"]),
    ("localhost", ["localhost"]),
  ],
)
def test_expand_hostlist(hostlist, expected):
  assert expand_hostlist(hostlist) == expected


@pytest.mark.parametrize("bad", ["node[1-", "node]1[", "node[a-b]", "node[3-1]"])
def test_expand_hostlist_rejects_malformed(bad):
  with pytest.raises(DistributedConfigError):
    expand_hostlist(bad)


def test_no_settings_is_single_process():
  assert resolve_distributed(_args(), {}) is None
  assert resolve_distributed(None, {"HOME": "/root"}) is None


def test_flags():
  cfg = resolve_distributed(
    _args(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1), {}
  )
  assert tuple(cfg) == ("10.0.0.1:1234", 2, 1)
  assert cfg.source == "flags" and not cfg.is_primary
  assert cfg.initialize_kwargs() == {
    "coordinator_address": "10.0.0.1:1234",
    "num_processes": 2,
    "process_id": 1,
    "cluster_detection_method": "deactivate",
    "coordinator_bind_address": "10.0.0.1:1234",
  }


def test_coordinator_binds_to_its_address_and_jax_variable_wins(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_BIND_ADDRESS", raising=False)
  cfg = resolve_distributed(
    _args(coordinator_address="localhost:1234", num_processes=2, process_id=0), {}
  )
  assert cfg.initialize_kwargs()["coordinator_bind_address"] == "127.0.0.1:1234"
  monkeypatch.setenv("JAX_COORDINATOR_BIND_ADDRESS", "[::]:1234")
  assert cfg.initialize_kwargs()["coordinator_bind_address"] == "[::]:1234"


def test_one_node_slurm_step_coordinates_over_loopback():
  env = {**SLURM_STEP, "SLURM_STEP_NODELIST": "gpu07", "SLURM_JOB_NODELIST": "gpu07"}
  cfg = resolve_distributed(_args(), env)
  assert cfg.coordinator_address == f"127.0.0.1:{slurm_port(env)}"
  assert cfg.initialize_kwargs()["coordinator_bind_address"] == cfg.coordinator_address


def test_tuple_unpacking():
  coordinator, num, pid = resolve_distributed(
    _args(coordinator_address="h:1", num_processes=3, process_id=0), {}
  )
  assert (coordinator, num, pid) == ("h:1", 3, 0)


def test_env():
  env = {"ABLAX_COORDINATOR": "head:9999", "ABLAX_NUM_PROCESSES": "8", "ABLAX_PROCESS_ID": "0"}
  cfg = resolve_distributed(_args(), env)
  assert tuple(cfg) == ("head:9999", 8, 0) and cfg.source == "env" and cfg.is_primary


def test_jax_coordinator_env_is_accepted():
  env = {"JAX_COORDINATOR_ADDRESS": "head:1", "ABLAX_NUM_PROCESSES": "2", "ABLAX_PROCESS_ID": "1"}
  assert tuple(resolve_distributed(_args(), env)) == ("head:1", 2, 1)


def test_flags_win_over_env_field_by_field():
  env = {"ABLAX_COORDINATOR": "head:9999", "ABLAX_NUM_PROCESSES": "8", "ABLAX_PROCESS_ID": "5"}
  cfg = resolve_distributed(_args(process_id=2), env)
  assert tuple(cfg) == ("head:9999", 8, 2) and cfg.source == "flags"


def test_slurm_step():
  cfg = resolve_distributed(_args(), SLURM_STEP)
  assert tuple(cfg) == (f"gpu07:{slurm_port(SLURM_STEP)}", 4, 3)
  assert cfg.source == "slurm"
  # JAX's own detection would pin this process to GPU SLURM_LOCALID; ours does not.
  assert cfg.local_device_ids is None
  assert cfg.initialize_kwargs()["cluster_detection_method"] == "deactivate"


def test_slurm_port_is_stable_and_in_range():
  port = slurm_port(SLURM_STEP)
  assert port == slurm_port(dict(SLURM_STEP))
  assert 61440 <= port <= 65535
  assert slurm_port({**SLURM_STEP, "SLURM_JOB_ID": "4243"}) != port
  assert slurm_port({**SLURM_STEP, "SLURM_STEP_ID": "1"}) != port


def test_slurm_port_override():
  cfg = resolve_distributed(_args(), {**SLURM_STEP, "ABLAX_COORDINATOR_PORT": "12345"})
  assert cfg.coordinator_address == "gpu07:12345"
  cfg = resolve_distributed(_args(), {**SLURM_STEP, "JAX_COORDINATOR_PORT": "23456"})
  assert cfg.coordinator_address == "gpu07:23456"


def test_slurm_job_nodelist_fallback():
  env = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}
  env["SLURM_JOB_NODELIST"] = "cn[3,5]"
  assert resolve_distributed(_args(), env).coordinator_address.startswith("cn3:")


def test_flags_and_env_win_over_slurm():
  cfg = resolve_distributed(_args(coordinator_address="login:7777"), SLURM_STEP)
  assert tuple(cfg) == ("login:7777", 4, 3) and cfg.source == "flags"
  cfg = resolve_distributed(_args(), {**SLURM_STEP, "ABLAX_PROCESS_ID": "0"})
  assert tuple(cfg)[1:] == (4, 0) and cfg.source == "env"


def test_single_task_slurm_job_is_single_process():
  env = {
    "SLURM_JOB_ID": "7",
    "SLURM_PROCID": "0",
    "SLURM_NTASKS": "1",
    "SLURM_JOB_NODELIST": "localhost",
  }
  assert resolve_distributed(_args(), env) is None
  # An array task of a sweep: one task, no step variables.
  env = {
    "SLURM_JOB_ID": "8",
    "SLURM_ARRAY_JOB_ID": "7",
    "SLURM_ARRAY_TASK_ID": "1",
    "SLURM_PROCID": "0",
    "SLURM_JOB_NODELIST": "localhost",
  }
  assert resolve_distributed(_args(), env) is None


def test_batch_script_with_several_tasks_needs_srun():
  env = {
    "SLURM_JOB_ID": "9",
    "SLURM_PROCID": "0",
    "SLURM_NTASKS": "2",
    "SLURM_JOB_NODELIST": "n[1-2]",
  }
  with pytest.raises(DistributedConfigError, match="srun"):
    resolve_distributed(_args(), env)
  # Complete flags need nothing from SLURM (another launcher inside the job).
  cfg = resolve_distributed(_args(coordinator_address="n1:1", num_processes=2, process_id=1), env)
  assert tuple(cfg) == ("n1:1", 2, 1)


def test_incomplete_settings_name_what_is_missing():
  with pytest.raises(DistributedConfigError, match="coordinator_address"):
    resolve_distributed(_args(num_processes=2, process_id=0), {})
  with pytest.raises(DistributedConfigError, match="num_processes"):
    resolve_distributed(_args(coordinator_address="h:1"), {})


def test_one_process_needs_no_coordinator():
  assert resolve_distributed(_args(num_processes=1, process_id=0), {}) is None


@pytest.mark.parametrize(
  "kw",
  [
    dict(coordinator_address="h:1", num_processes=2, process_id=2),
    dict(coordinator_address="h:1", num_processes=2, process_id=-1),
    dict(coordinator_address="no-port", num_processes=2, process_id=0),
  ],
)
def test_invalid_values(kw):
  with pytest.raises(DistributedConfigError):
    resolve_distributed(_args(**kw), {})


def test_bad_integers_in_env():
  with pytest.raises(DistributedConfigError, match="ABLAX_NUM_PROCESSES"):
    resolve_distributed(_args(), {"ABLAX_NUM_PROCESSES": "two"})


def test_auto_mode_defers_to_jax_detection():
  cfg = resolve_distributed(_args(), {"ABLAX_DISTRIBUTED": "auto"})
  assert cfg == DistributedConfig(None, None, None, None, source="auto")
  assert cfg.initialize_kwargs() == {}
  # Explicit values still win over detection.
  cfg = resolve_distributed(
    _args(coordinator_address="h:1", num_processes=2, process_id=0), {"ABLAX_DISTRIBUTED": "auto"}
  )
  assert cfg.source == "flags"


def test_gke_tpu_environment_is_auto():
  cfg = resolve_distributed(_args(), {"TPU_WORKER_HOSTNAMES": "w0,w1", "TPU_WORKER_ID": "1"})
  assert cfg.source == "auto"


def test_off_mode():
  assert resolve_distributed(_args(), {**SLURM_STEP, "ABLAX_DISTRIBUTED": "off"}) is None
  with pytest.raises(DistributedConfigError):
    resolve_distributed(_args(num_processes=2), {"ABLAX_DISTRIBUTED": "off"})
  with pytest.raises(DistributedConfigError):
    resolve_distributed(_args(), {"ABLAX_DISTRIBUTED": "yes"})


def test_local_device_ids():
  cfg = resolve_distributed(_args(), {**SLURM_STEP, "ABLAX_LOCAL_DEVICE_IDS": "1"})
  assert cfg.local_device_ids == (1,)
  assert cfg.initialize_kwargs()["local_device_ids"] == [1]
  with pytest.raises(DistributedConfigError):
    resolve_distributed(_args(), {**SLURM_STEP, "ABLAX_LOCAL_DEVICE_IDS": "a,b"})


def test_jax_env_names_are_accepted():
  env = {"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert tuple(resolve_distributed(_args(), env)) == ("h:2", 4, 3)
  env["ABLAX_PROCESS_ID"] = "1"  # ours first
  assert tuple(resolve_distributed(_args(), env)) == ("h:2", 4, 1)


def test_initialize_from(monkeypatch):
  from launch import distributed

  calls = []
  monkeypatch.setattr(distributed, "initialize", lambda config: calls.append(config))
  assert distributed.initialize_from(_args(), {}, detected=lambda: False) is None
  assert calls == [None]
  # A cluster only JAX knows (e.g. Open MPI): JAX detects everything.
  cfg = distributed.initialize_from(_args(), {}, detected=lambda: True)
  assert cfg.source == "auto" and calls[-1] is cfg
  # ... unless switched off, or a one-task SLURM job (nothing to join).
  assert (
    distributed.initialize_from(_args(), {"ABLAX_DISTRIBUTED": "off"}, detected=lambda: True)
    is None
  )
  single = {"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
  assert distributed.initialize_from(_args(), single, detected=lambda: True) is None
  cfg = distributed.initialize_from(_args(), SLURM_STEP, detected=lambda: True)
  assert cfg.source == "slurm"
