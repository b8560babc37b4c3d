"""Against real services on localhost: a single-node SLURM and PostgreSQL behind `mlflow server`.

Set-up is the scripts in tests/cluster/ (SLURM: munged, slurmctld, slurmd with
cgroup-free settings; PostgreSQL: initdb + pg_ctl in a temporary directory) and
deploy/mlflow_postgres/ (the documented server start). Tests skip, naming what
to install, where the binaries are missing:

  apt-get install slurm-wlm munge postgresql
  .venv/bin/pip install 'psycopg[binary]==3.3.9'
  .venv/bin/python -m pytest -m cluster tests/test_cluster_integration.py
"""

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "tests" / "cluster"
DEPLOY = REPO / "deploy" / "mlflow_postgres"
PYTHON = sys.executable


def _missing(*names: str) -> list[str]:
  return [
    n
    for n in names
    if shutil.which(n) is None and not any(Path(d, n).exists() for d in ("/usr/sbin", "/sbin"))
  ]


def _script(path: Path, *args, env=None, timeout=180) -> subprocess.CompletedProcess:
  return subprocess.run(
    ["bash", str(path), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
  )


# ----------------------------------------------------------------- SLURM


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
  missing = _missing("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol")
  if missing:
    pytest.skip(
      f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    )
  if os.geteuid() != 0:
    pytest.skip("the local SLURM set-up runs slurmd as root; run the cluster tests as root")
  state = tmp_path_factory.mktemp("slurm")
  started = _script(CLUSTER / "start_slurm.sh", state)
  patch = pytest.MonkeyPatch()
  try:
    if started.returncode != 0:
      pytest.fail(f"start_slurm.sh failed:\n{started.stdout}\n{started.stderr}")
    patch.setenv("SLURM_CONF", str(state / "slurm.conf"))
    yield state
  finally:
    patch.undo()
    _script(CLUSTER / "stop_slurm.sh", state)


def _tiny_sweep():
  from launch import sweep as sweep_lib

  sweep = sweep_lib.Sweep(
    name="clusterdemo",
    base=["gin/models/tiny_llama.gin"],
    axes={"kv": {"binding": "ModelConfig.num_kv_heads", "values": [1, 2]}},
    seeds=[0, 1],
  )
  return sweep, sweep_lib.expand(sweep)


def test_sweep_as_job_array_status_and_resubmission(slurm_cluster, tmp_path, monkeypatch):
  """Four points as one array; one fails; a second submission runs only that one."""
  from mlflow.tracking import MlflowClient
  from launch import slurm, slurm_sweep, sweep_runner

  sweep, points = _tiny_sweep()
  uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
  workdir = tmp_path / "sweep"
  parent = sweep_runner.open_parent(sweep, points, uri, workdir)
  monkeypatch.setenv("FAIL_ONCE_POINT", points[1].key)
  stub = [PYTHON, str(CLUSTER / "stub_train.py")]
  resources = slurm.SlurmResources(cpus_per_task=1, mem="1G", time="00:10:00", max_parallel=2)

  first = slurm_sweep.submit_sweep(
    sweep,
    points,
    tracking_uri=uri,
    parent_run_id=parent,
    workdir=workdir,
    resources=resources,
    train_command=stub,
  )
  assert first.indices == [0, 1, 2, 3]
  final = slurm.wait([first.job_id], timeout_s=300, poll_s=1)
  assert {i: t.state for (_, i), t in final.items()} == {
    0: "COMPLETED",
    1: "FAILED",
    2: "COMPLETED",
    3: "COMPLETED",
  }
  rows = slurm_sweep.sweep_status(points, tracking_uri=uri, parent_run_id=parent, workdir=workdir)
  assert [(r.slurm, r.mlflow) for r in rows] == [
    ("COMPLETED", "FINISHED"),
    ("FAILED", "FAILED"),
    ("COMPLETED", "FINISHED"),
    ("COMPLETED", "FINISHED"),
  ]
  print(slurm_sweep.format_status(rows))

  client = MlflowClient(uri)
  tags = client.get_run(parent).data.tags
  assert tags[slurm.JOB_IDS_TAG] == first.job_id
  assert tags[slurm.ARRAY_TAG] == f"{first.job_id}:0-3"
  assert [a.path for a in client.list_artifacts(parent, f"slurm/{first.job_id}")] == [
    f"slurm/{first.job_id}/array-000.sbatch"
  ]
  children = sweep_runner.child_runs(uri, parent)  # created before submission, one per point
  assert sorted(int(r.data.tags["slurm.array_task"]) for r in children) == [0, 1, 2, 3]
  for run in children:  # each task ran its own point
    index = int(run.data.tags["slurm.array_task"])
    assert run.data.tags[sweep_runner.POINT_TAG] == points[index].key
  logs = sorted(p.name for p in (workdir / "slurm" / "logs").iterdir())
  assert logs == [f"ablax-clusterdemo-{first.job_id}_{i}.log" for i in range(4)]

  second = slurm_sweep.submit_sweep(
    sweep,
    points,
    tracking_uri=uri,
    parent_run_id=parent,
    workdir=workdir,
    resources=resources,
    train_command=stub,
  )
  assert second.indices == [1]
  slurm.wait([second.job_id], timeout_s=300, poll_s=1)
  rows = slurm_sweep.sweep_status(points, tracking_uri=uri, parent_run_id=parent, workdir=workdir)
  assert all(r.mlflow == "FINISHED" for r in rows)
  assert rows[1].job == second.job_id
  assert slurm_sweep.settle_parent(rows, tracking_uri=uri, parent_run_id=parent) == "FINISHED"
  parent_run = client.get_run(parent)
  assert parent_run.info.status == "FINISHED"
  assert parent_run.data.tags[slurm.JOB_IDS_TAG] == f"{first.job_id},{second.job_id}"
  assert json.loads((workdir / slurm.STATE_FILE).read_text())["submissions"][1]["indices"] == [1]
  assert (
    slurm_sweep.submit_sweep(
      sweep,
      points,
      tracking_uri=uri,
      parent_run_id=parent,
      workdir=workdir,
      resources=resources,
      train_command=stub,
    )
    is None
  )


def test_ablax_sweep_launcher_slurm_and_status(slurm_cluster, tmp_path):
  """The CLI: `ablax sweep --launcher slurm` submits and returns; `--status` reports and settles."""
  sweep_file = tmp_path / "cluster_sweep.gin"
  sweep_file.write_text(
    textwrap.dedent("""\
      from __gin__ import dynamic_registration
      import launch.slurm
      import launch.sweep

      launch.sweep.Sweep:
        name = 'clustercli'
        base = ['gin/experiments/tiny_llama.gin']
        axes = {'kv': {'binding': 'core.model.config.ModelConfig.num_kv_heads', 'values': [1, 2]}}
        seeds = [0]
      launch.slurm.SlurmResources.time = '00:10:00'
      launch.slurm.SlurmResources.mem = '4G'
  """)
  )
  workdir, uri = tmp_path / "sweep", f"sqlite:///{tmp_path / 'mlflow.db'}"
  common = [str(sweep_file), "--workdir", str(workdir), "--tracking_uri", uri]
  cli = [PYTHON, "-m", "launch.cli", "sweep"]
  submitted = subprocess.run(
    cli
    + common
    + [
      "--launcher",
      "slurm",
      "--slurm_cpus_per_task",
      "1",
      "--train_command",
      f"{PYTHON} {CLUSTER / 'stub_train.py'}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert submitted.returncode == 0, submitted.stderr
  assert "submitted SLURM job array" in submitted.stdout
  script = (workdir / "slurm" / "array-000.sbatch").read_text()
  for directive in ("--time=00:10:00", "--mem=4G", "--cpus-per-task=1", "--array=0-1"):
    assert f"#SBATCH {directive}" in script  # gin and flag resources combined
  from launch import slurm, slurm_sweep

  job = slurm_sweep.load_state(workdir)["submissions"][0]["job_id"]
  slurm.wait([job], timeout_s=300, poll_s=1)
  status = subprocess.run(
    cli + common + ["--status"], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert status.returncode == 0, status.stderr
  assert "2 points: 2 finished" in status.stdout
  assert f"{job}_0" in status.stdout and "parent run: FINISHED" in status.stdout
  again = subprocess.run(
    cli + common + ["--launcher", "slurm"], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert again.returncode == 0 and "nothing to submit" in again.stdout


def _run_two_process_task(
  tmp_path, job_name: str, time_limit: str, timeout_s: float, command: list[str]
) -> tuple[str, str]:
  """Submits `command` as one task of 2 processes (srun) and waits: (final state, the logs)."""
  from launch import slurm

  script = slurm.render_array_script(
    {0: command},
    slurm.SlurmResources(ntasks_per_node=2, cpus_per_task=1, time=time_limit),
    job_name=job_name,
    log_dir=tmp_path,
    chdir=REPO,
  )
  path = tmp_path / f"{job_name}.sbatch"
  path.write_text(script)
  final = slurm.wait([slurm.submit(path)], timeout_s=timeout_s, poll_s=1)
  log = "\n".join(p.read_text() for p in tmp_path.glob(f"{job_name}-*.log"))
  (state,) = [t.state for t in final.values()]
  return state, log


def test_two_process_jax_run_under_srun(slurm_cluster, tmp_path, monkeypatch):
  """A point with ntasks_per_node=2 runs under srun; both processes find each other."""
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  out = tmp_path / "out"
  out.mkdir()
  state, log = _run_two_process_task(
    tmp_path, "ablax-two", "00:10:00", 300, [PYTHON, str(CLUSTER / "jax_two_process.py"), str(out)]
  )
  assert state == "COMPLETED", log
  results = [json.loads((out / f"process-{i}.json").read_text()) for i in range(2)]
  for i, r in enumerate(results):
    assert r["source"] == "slurm" and r["config"][1:] == [2, i]
    assert (r["process_index"], r["process_count"]) == (i, 2)
    assert (r["local_device_count"], r["device_count"]) == (2, 4)
    assert r["gathered"] == [1, 1, 2, 2]
  assert results[0]["config"][0] == results[1]["config"][0]
  assert results[0]["config"][0].startswith("localhost:")


def test_ablax_train_two_processes_under_srun(slurm_cluster, tmp_path, monkeypatch):
  """Real `ablax train`, 2 processes on SLURM: one MLflow run, written by process 0 only."""
  from mlflow.tracking import MlflowClient

  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
  workdir = tmp_path / "run"
  train = [
    PYTHON,
    "-m",
    "launch.cli",
    "train",
    "--gin_file",
    "gin/experiments/tiny_llama.gin",
    "--workdir",
    str(workdir),
    "--tracking_uri",
    uri,
  ]
  for binding in (
    "num_steps = 4",
    "log_every = 2",
    "checkpoint_every = 2",
    "eval_every = 4",
    "eval_batches = 1",
  ):
    train += ["--gin_param", f"core.train.loop.train.{binding}"]
  state, log = _run_two_process_task(tmp_path, "ablax-train2", "00:20:00", 900, train)
  assert state == "COMPLETED", log[-5000:]
  assert log.count("new run in") == 1  # progress lines come from process 0 only
  assert "fsdp=2" in log  # one mesh over both processes' devices
  assert (workdir / "checkpoints" / "4").is_dir()
  assert (workdir / "model" / "ablax_model.json").is_file()  # exported by process 0, no hang
  client = MlflowClient(uri)
  runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
  assert len(runs) == 1  # process 1 created no run of its own
  run = runs[0]
  assert run.info.run_id == json.loads((workdir / "run.json").read_text())["mlflow_run_id"]
  assert run.info.status == "FINISHED"
  steps = {
    m.step for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)
  }
  assert 4 in steps


# --------------------------------------------- PostgreSQL + mlflow server


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_uri(tmp_path_factory):
  if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) and shutil.which("initdb") is None:
    pytest.skip("PostgreSQL is not installed: apt-get install postgresql")
  try:
    import psycopg  # noqa: F401  SQLAlchemy 2.1's driver for postgresql:// URIs
  except ImportError:
    pytest.skip("the PostgreSQL driver is missing: pip install 'psycopg[binary]==3.3.9'")
  state = tmp_path_factory.mktemp("postgres")
  try:
    started = _script(CLUSTER / "start_postgres.sh", state)
    if started.returncode != 0:
      pytest.fail(f"start_postgres.sh failed:\n{started.stdout}\n{started.stderr}")
    env_text = (state / "env.sh").read_text()
    uri = next(
      line.split("=", 1)[1]
      for line in env_text.splitlines()
      if line.startswith("export MLFLOW_BACKEND_STORE_URI=")
    )
    yield uri
  finally:
    _script(CLUSTER / "stop_postgres.sh", state)


class Server:
  """deploy/mlflow_postgres/start_server.sh, as documented, on a free port."""

  def __init__(self, root: Path, backend_uri: str, **env: str):
    self.root, self.port = root, _free_port()
    self.uri = f"http://127.0.0.1:{self.port}"
    self.env = dict(
      os.environ,
      MLFLOW_BACKEND_STORE_URI=backend_uri,
      MLFLOW_ARTIFACTS=str(root / "artifacts"),
      MLFLOW_PORT=str(self.port),
      MLFLOW_WORKERS="2",
      MLFLOW_SERVER_DIR=str(root / "server"),
      MLFLOW_BIN=str(Path(PYTHON).with_name("mlflow")),
      **env,
    )
    self.env.pop("MLFLOW_TRACKING_URI", None)

  def start(self) -> "Server":
    started = _script(DEPLOY / "start_server.sh", env=self.env, timeout=300)
    if started.returncode != 0:
      self.stop()
      pytest.fail(f"start_server.sh failed:\n{started.stdout}\n{started.stderr}")
    return self

  def stop(self) -> None:
    _script(DEPLOY / "stop_server.sh", env=self.env)


@pytest.fixture(scope="module")
def pg_server(postgres_uri, tmp_path_factory):
  server = Server(tmp_path_factory.mktemp("mlflow"), postgres_uri).start()
  try:
    yield server
  finally:
    server.stop()


def _listening_addresses(port: int) -> set[str]:
  """Local addresses with a socket listening on `port` (from /proc/net/tcp)."""
  found = set()
  for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
      lines = Path(table).read_text().splitlines()[1:]
    except OSError:
      continue
    for line in lines:
      local, state = line.split()[1], line.split()[3]
      address, hexport = local.split(":")
      if state == "0A" and int(hexport, 16) == port:
        found.add(address)
  return found


def test_server_binds_to_localhost_only(pg_server):
  assert _listening_addresses(pg_server.port) == {"0100007F"}  # 127.0.0.1, no IPv6


def test_database_password_is_in_no_server_command_line(pg_server, postgres_uri):
  import psutil  # pylint: disable=g-import-not-at-top

  password = urllib.parse.urlsplit(postgres_uri).password
  assert password
  server = psutil.Process(int((pg_server.root / "server" / "server.pid").read_text()))
  processes = [server, *server.children(recursive=True)]  # mlflow server and its workers
  assert len(processes) > 1
  for process in processes:
    assert password not in "\0".join(process.cmdline()), process.cmdline()


STEPS = 200
KEYS = ("loss", "lr", "tokens_per_s")


def _log_from_process(uri: str, workdir: str, index: int, out) -> None:
  os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
  sys.path.insert(0, str(REPO))
  from core.tracking.run import RunTracker

  tracker = RunTracker(
    uri,
    "shared-server",
    run_name=f"process-{index}",
    workdir=workdir,
    retry_interval_s=0.2,
    start_timeout_s=180,
  )
  tracker.start()
  tracker.log_params({"index": index, "note": "x" * 100})
  for step in range(STEPS):
    tracker.log_metrics({k: index * 1000 + step + i / 10 for i, k in enumerate(KEYS)}, step)
  deadline = time.monotonic() + 240
  while not tracker.flush(10) and time.monotonic() < deadline:
    pass
  out.put((index, tracker.run_id, tracker.end()))


def test_runs_from_several_processes_land_with_nothing_lost(pg_server, tmp_path):
  from mlflow.tracking import MlflowClient

  ctx = multiprocessing.get_context("spawn")
  out = ctx.Queue()
  procs = [
    ctx.Process(target=_log_from_process, args=(pg_server.uri, str(tmp_path / f"run-{i}"), i, out))
    for i in range(4)
  ]
  for p in procs:
    p.start()
  results = sorted(out.get(timeout=600) for _ in procs)
  for p in procs:
    p.join(60)
    assert p.exitcode == 0
  client = MlflowClient(pg_server.uri)
  for index, run_id, _ in results:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["index"] == str(index)
    for i, key in enumerate(KEYS):
      history = client.get_metric_history(run_id, key)
      assert sorted(m.step for m in history) == list(range(STEPS))
      assert {m.step: m.value for m in history} == {
        s: index * 1000 + s + i / 10 for s in range(STEPS)
      }
  # Nothing is left in a workdir waiting for upload.
  from core.tracking.sync import Syncer

  assert [Syncer(tmp_path / f"run-{index}", run_id).pending() for index, run_id, _ in results] == [
    0
  ] * len(results)
  # Artifacts go through the server to its artifact root.
  note = tmp_path / "note.txt"
  note.write_text("hello")
  client.log_artifact(results[0][1], str(note))
  stored = list((pg_server.root / "artifacts").rglob("note.txt"))
  assert len(stored) == 1 and stored[0].read_text() == "hello"


def test_basic_auth_server(postgres_uri, tmp_path, monkeypatch):
  """MLflow's basic-auth app: anonymous requests get 401, the admin's credentials work."""
  from mlflow.tracking import MlflowClient

  server = Server(
    tmp_path,
    postgres_uri,
    MLFLOW_AUTH="basic",
    MLFLOW_AUTH_ADMIN_PASSWORD="s3cret-pass-for-tests",
    MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key-0123456789abcdef",
  ).start()
  try:
    url = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as denied:
      urllib.request.urlopen(url, timeout=30)
    assert denied.value.code == 401
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pass-for-tests")
    client = MlflowClient(server.uri)
    experiment_id = client.create_experiment("with-auth")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "loss", 0.5, step=1)
    assert client.get_run(run.info.run_id).data.metrics == {"loss": 0.5}
  finally:
    server.stop()
