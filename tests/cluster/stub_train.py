"""A stand-in for `ablax train` that honours the sweep child contract only.

It lets the SLURM array tests check the launcher (one task per point, job ids,
status, resubmission) in seconds, apart from the cost of real training. As
launch/sweep_runner.py runs a child:
  stub_train.py --gin_file F ... --gin_param P ... --workdir DIR --tracking_uri URI
where DIR/run.json names the MLflow run the sweep created for the point. The
point whose key (the workdir's name) is FAIL_ONCE_POINT fails once (a marker
file in its workdir remembers that), so a resubmission can be tested.
"""

import argparse
import json
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def main() -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--gin_file", action="append", default=[])
  p.add_argument("--gin_param", action="append", default=[])
  p.add_argument("--workdir", required=True)
  p.add_argument("--tracking_uri", required=True)
  args = p.parse_args()
  from mlflow.tracking import MlflowClient

  workdir = Path(args.workdir)
  run_id = json.loads((workdir / "run.json").read_text())["mlflow_run_id"]
  client = MlflowClient(args.tracking_uri)
  client.update_run(run_id, status="RUNNING")
  client.set_tag(run_id, "slurm.array_task", os.environ.get("SLURM_ARRAY_TASK_ID", ""))
  client.set_tag(run_id, "slurm.host", socket.gethostname())
  client.log_metric(run_id, "eval/loss", 1.0 + len(args.gin_param) / 100, step=1)
  marker = workdir / "failed-once"
  if workdir.name == os.environ.get("FAIL_ONCE_POINT") and not marker.exists():
    marker.write_text("x")
    client.set_terminated(run_id, "FAILED")
    print(f"stub_train: failing point {workdir.name} once", file=sys.stderr)
    return 3
  client.set_terminated(run_id, "FINISHED")
  print(f"stub_train: point {workdir.name} done in run {run_id}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
