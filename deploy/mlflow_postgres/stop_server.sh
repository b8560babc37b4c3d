#!/usr/bin/env bash
# Stops the server start_server.sh started (its whole process group).
set -uo pipefail
SERVER_DIR=${MLFLOW_SERVER_DIR:-$PWD/mlflow-server}
pid=$(cat "$SERVER_DIR/server.pid" 2>/dev/null) || { echo "no $SERVER_DIR/server.pid" >&2; exit 0; }
kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || exit 0
for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || { rm -f "$SERVER_DIR/server.pid"; exit 0; }; sleep 0.1; done
kill -KILL -- "-$pid" 2>/dev/null || true
rm -f "$SERVER_DIR/server.pid"
