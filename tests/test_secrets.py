"""Secrets stay out of files, command lines and printed lines.

A tracking URI's credentials never reach run.json, sweep.json, a child's argv
or stdout; process 0's JAX coordinator listens on loopback, not every interface.
"""

import ipaddress
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from core.tracking.store import adopt_credentials, public_uri
from launch import cli
from launch.distributed import DistributedConfig, bind_address
from tests.test_train_faults import RUN_GIN
from tests.test_tracking_server import MlflowServer, _free_port

REPO = Path(__file__).resolve().parent.parent
USER, PASSWORD = "ablax-user", "s3cret-pw"
_CRED_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD")


@pytest.fixture
def clean_credentials(monkeypatch):
  """No credential variables at the start, and none left behind by adopt_credentials."""
  for var in _CRED_VARS:
    monkeypatch.setenv(var, "")  # records the variable's state, which the teardown restores
    monkeypatch.delenv(var)


def test_public_uri_and_adopt_credentials(clean_credentials):
  assert public_uri("http://u:p%40ss@host:5000/x") == "http://host:5000/x"
  assert public_uri("https://token@host") == "https://host"
  assert public_uri("postgresql://mlflow:pw@db:5432/mlflow") == "postgresql://mlflow@db:5432/mlflow"
  for unchanged in ("http://host:5000", "sqlite:////tmp/a@b/mlflow.db", "databricks", None):
    assert public_uri(unchanged) == unchanged
  assert adopt_credentials("http://u%3Ax:p%40ss@host:5000") == "http://host:5000"
  assert os.environ["MLFLOW_TRACKING_USERNAME"] == "u:x"
  assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss"
  assert adopt_credentials("postgresql://mlflow:pw@db/mlflow") == "postgresql://mlflow@db/mlflow"
  assert os.environ["PGPASSWORD"] == "pw"


@pytest.fixture
def server(tmp_path):
  srv = MlflowServer(tmp_path, _free_port())
  srv.start()
  yield srv
  srv.stop()


def test_credentials_never_reach_run_json_sweep_json_argv_or_stdout(
  server, tmp_path, capsys, monkeypatch, clean_credentials
):
  monkeypatch.setenv("XLA_FLAGS", "")  # one device per child process
  uri = server.uri.replace("http://", f"http://{USER}:{PASSWORD}@")
  # A train that opens its MLflow run, then fails on an unreadable checkpoint (before compiling).
  gin_file = tmp_path / "run.gin"
  gin_file.write_text(RUN_GIN)
  step = tmp_path / "t" / "checkpoints" / "2"
  step.mkdir(parents=True)
  (step / "_CHECKPOINT_METADATA").write_text('{"item_handlers": {}}')
  code = cli.main(
    ["train", "--gin_file", str(gin_file), "--workdir", str(tmp_path / "t"), "--tracking_uri", uri]
  )
  train_out = capsys.readouterr()
  assert code == 2, train_out.err[-2000:]
  record = json.loads((tmp_path / "t" / "run.json").read_text())
  assert record["tracking_uri"] == server.uri
  # The credentials went where MLflow reads them.
  assert os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD

  # A sweep of one point whose child fails at once: sweep.json, the child's run.json and
  # its command line (the sweep's log names it) are written all the same.
  sweep = tmp_path / "s.gin"
  sweep.write_text(
    textwrap.dedent(f"""\
      from __gin__ import dynamic_registration
      import launch.sweep
      launch.sweep.Sweep:
        name = 'secrets'
        base = ['{gin_file}']
        params = ['core.train.loop.train.num_steps = 0']
        axes = {{'lr': {{'a': ['core.train.optimizer.llama_adamw.peak_lr = 1e-2']}}}}
        seeds = [0]
      """)
  )
  code = cli.main(
    ["sweep", str(sweep), "--workdir", str(tmp_path / "s"), "--tracking_uri", uri, "--workers", "1"]
  )
  sweep_out = capsys.readouterr()
  assert code == 1, sweep_out.out[-2000:] + sweep_out.err[-2000:]  # its one point failed
  state = json.loads((tmp_path / "s" / "sweep.json").read_text())
  assert state["tracking_uri"] == server.uri
  child_records = list((tmp_path / "s").glob("*/run.json"))
  assert child_records
  # The point's log starts with the child's command line: the URI is there, its password not.
  logs = [p.read_text() for p in (tmp_path / "s" / "logs").glob("*.log")]
  assert logs and all(f"--tracking_uri {server.uri}" in log for log in logs), logs
  written = [
    p
    for p in tmp_path.rglob("*")
    if p.is_file() and p.suffix in (".json", ".log", ".gin", ".sh", "")
  ]
  for path in written:
    assert PASSWORD not in path.read_text(errors="replace"), path
  for text in (train_out.out, train_out.err, sweep_out.out, sweep_out.err):
    assert PASSWORD not in text and USER not in text
  # MLflow prints its own "View run ... at: <store>" line when a run ends.
  view = [l for l in train_out.out.splitlines() + sweep_out.out.splitlines() if "View run" in l]
  assert view and all(server.uri in l for l in view), view


# -- the JAX coordinator --------------------------------------------------------------------


def test_bind_address_is_the_coordinator_address():
  assert bind_address("localhost:1234") == "127.0.0.1:1234"
  assert bind_address("10.0.0.1:1234") == "10.0.0.1:1234"
  assert bind_address("[::1]:99") == "[::1]:99"
  kwargs = DistributedConfig("node7:4321", 2, 1).initialize_kwargs()
  assert kwargs["coordinator_bind_address"] == "node7:4321"


_COORDINATOR = """
import sys
sys.path.insert(0, {repo!r})
from launch import distributed
# Process 0 of 2: starts the coordinator service, then waits for process 1, which never comes.
distributed.initialize(distributed.DistributedConfig({address!r}, 2, 0))
"""


def _loopback(address: str) -> bool:
  ip = ipaddress.ip_address(address)
  return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def _listening(pid: int, port: int) -> set[str]:
  try:
    conns = psutil.Process(pid).net_connections(kind="tcp")
  except psutil.Error:
    return set()
  return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_coordinator_listens_on_loopback_only(tmp_path):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  env.pop("JAX_COORDINATOR_BIND_ADDRESS", None)
  proc = subprocess.Popen(
    [sys.executable, "-c", _COORDINATOR.format(repo=str(REPO), address=f"localhost:{port}")],
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.monotonic() + 120
    addresses: set[str] = set()
    while time.monotonic() < deadline and not addresses:
      assert proc.poll() is None, proc.communicate()[1][-2000:]
      addresses = _listening(proc.pid, port)
      time.sleep(0.1)
    # JAX's default is '::' (every interface, IPv4 and IPv6). gRPC may hold 127.0.0.1 in a
    # dual-stack socket, as ::ffff:127.0.0.1: still IPv4 loopback alone.
    assert addresses and all(_loopback(a) for a in addresses), addresses
  finally:
    proc.kill()
    proc.wait(30)


# -- deploy/mlflow_postgres ------------------------------------------------------------------


def test_create_database_gives_psql_no_password_in_argv(tmp_path):
  """psql's command line, as `ps` would show it, holds no password; its script reads the env."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "psql"
  fake.write_text(
    f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path}/argv\ncat > {tmp_path}/script\n'
  )
  fake.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", MLFLOW_DB_PASSWORD=PASSWORD)
  out = subprocess.run(
    ["bash", str(REPO / "deploy" / "mlflow_postgres" / "create_database.sh"), "-h", "db.internal"],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == 0, out.stderr
  argv = (tmp_path / "argv").read_text()
  assert "db.internal" in argv and PASSWORD not in argv
  assert "\\set password `printenv MLFLOW_DB_PASSWORD`" in (tmp_path / "script").read_text()


def test_start_server_gives_mlflow_no_store_uri_in_argv(tmp_path):
  """`mlflow server` gets the store URI (with its password) from MLFLOW_BACKEND_STORE_URI."""
  fake = tmp_path / "mlflow"
  fake.write_text(
    f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path}/argv\n'
    f'printf "%s" "$MLFLOW_BACKEND_STORE_URI" > {tmp_path}/env_uri\n'
  )
  fake.chmod(0o755)
  # The script checks the PostgreSQL driver with the python beside MLFLOW_BIN: say it is there.
  (tmp_path / "python").write_text("#!/bin/sh\nexit 0\n")
  (tmp_path / "python").chmod(0o755)
  store = f"postgresql://mlflow:{PASSWORD}@127.0.0.1:5432/mlflow"
  env = dict(
    os.environ,
    MLFLOW_BIN=str(fake),
    MLFLOW_BACKEND_STORE_URI=store,
    MLFLOW_FOREGROUND="1",
    MLFLOW_SERVER_DIR=str(tmp_path / "server"),
  )
  out = subprocess.run(
    ["bash", str(REPO / "deploy" / "mlflow_postgres" / "start_server.sh")],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == 0, out.stderr
  argv = (tmp_path / "argv").read_text().split("\n")
  assert argv[0] == "server" and "--host" in argv
  assert PASSWORD not in "\n".join(argv) and "--backend-store-uri" not in argv
  assert (tmp_path / "env_uri").read_text() == store
