#!/usr/bin/env bash
# Stops what start_slurm.sh STATE_DIR started (by the pid files it wrote).
set -uo pipefail
STATE_DIR=${1:?usage: stop_slurm.sh STATE_DIR}
for name in slurmd slurmctld munge/munged; do
  pidfile="$STATE_DIR/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || continue
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
done
exit 0
