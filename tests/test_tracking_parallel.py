"""Several processes logging to one sqlite store at once lose nothing."""

import multiprocessing

from mlflow.tracking import MlflowClient

STEPS = 150
KEYS = ("loss", "lr", "tokens_per_s")


def _worker(uri: str, workdir: str, index: int, out) -> None:
  try:
    _log(uri, workdir, index, out)
  except BaseException as e:  # report instead of leaving the parent waiting
    out.put((index, None, repr(e)))
    raise


def _log(uri: str, workdir: str, index: int, out) -> None:
  import os

  os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
  from core.tracking.run import RunTracker

  tracker = RunTracker(
    uri,
    "parallel",
    run_name=f"worker-{index}",
    workdir=workdir,
    retry_interval_s=0.2,
    start_timeout_s=180,
  )
  tracker.start()
  tracker.log_params({"index": index})
  for step in range(STEPS):
    tracker.log_metrics({k: index * 1000 + step + i / 10 for i, k in enumerate(KEYS)}, step)
  import time

  deadline = time.monotonic() + 180
  while not tracker.flush(10) and time.monotonic() < deadline:
    pass
  out.put((index, tracker.run_id, tracker.end()))


def test_parallel_processes_one_sqlite_store(tmp_path):
  # Fresh store: the processes also race to create its schema and experiment.
  uri = f"sqlite:///{tmp_path / 'shared.db'}"
  ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold jax threads
  out = ctx.Queue()
  procs = [
    ctx.Process(target=_worker, args=(uri, str(tmp_path / f"run{i}"), i, out)) for i in range(3)
  ]
  for p in procs:
    p.start()
  results = [out.get(timeout=400) for _ in procs]
  for p in procs:
    p.join(60)
    assert p.exitcode == 0
  client = MlflowClient(uri)
  assert all(ok is True for _, _, ok in results), results
  assert len({run_id for _, run_id, _ in results}) == 3
  for index, run_id, _ in results:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["index"] == str(index)
    for i, key in enumerate(KEYS):
      history = client.get_metric_history(run_id, key)
      assert [m.step for m in history] == list(range(STEPS)), (index, key)
      assert [m.value for m in history] == [index * 1000 + s + i / 10 for s in range(STEPS)]
