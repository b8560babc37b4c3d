"""A stand-in for `ablax train` that honours the sweep child contract only.

It lets the SLURM array tests check the launcher (one task per point, job ids,
status, resubmission) in seconds, apart from the cost of real training.
Usage (as launch/sweep_runner.child_command builds it):
  stub_train.py --gin_file F ... --gin_param P ... --workdir DIR --tracking_uri URI
      --experiment NAME --run_name NAME --parent_run_id ID --tag K=V ... --param K=V ...
A point fails once when FAIL_ONCE_POINT names its point key (a marker file in
its workdir remembers the failure), so a resubmission can be tested.
"""

import argparse
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def main() -> int:
  p = argparse.ArgumentParser()
  for flag in ("--gin_file", "--gin_param", "--tag", "--param"):
    p.add_argument(flag, action="append", default=[])
  for flag in ("--workdir", "--tracking_uri", "--experiment", "--run_name", "--parent_run_id"):
    p.add_argument(flag)
  args = p.parse_args()
  from mlflow.entities import Metric, Param, RunTag
  from mlflow.tracking import MlflowClient
  tags = dict(t.split("=", 1) for t in args.tag)
  params = dict(t.split("=", 1) for t in args.param)
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  client = MlflowClient(args.tracking_uri)
  experiment = client.get_experiment_by_name(args.experiment)
  run = client.create_run(experiment.experiment_id, run_name=args.run_name,
                          tags={**tags, "mlflow.parentRunId": args.parent_run_id,
                                "slurm.array_task": os.environ.get("SLURM_ARRAY_TASK_ID", ""),
                                "slurm.host": socket.gethostname()})
  run_id = run.info.run_id
  client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                   tags=[RunTag("gin_params", " | ".join(args.gin_param)[:5000])],
                   metrics=[Metric("eval/loss", 1.0 + len(args.gin_param) / 100, 0, 1)])
  key = tags.get("ablax.sweep.point", "")
  marker = workdir / "failed-once"
  if key and key == os.environ.get("FAIL_ONCE_POINT") and not marker.exists():
    marker.write_text("x")
    client.set_terminated(run_id, "FAILED")
    print(f"stub_train: failing point {key} once", file=sys.stderr)
    return 3
  client.set_terminated(run_id, "FINISHED")
  print(f"stub_train: point {key} done in run {run_id}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
