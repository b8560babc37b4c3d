#!/usr/bin/env bash
# A throw-away PostgreSQL server on 127.0.0.1 for the integration tests, with
# the `mlflow` role and database made by deploy/mlflow_postgres/create_database.sh.
#
# Usage: tests/cluster/start_postgres.sh STATE_DIR
# Writes STATE_DIR/env.sh with MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:...@127.0.0.1:PORT/mlflow.
# Stop:  tests/cluster/stop_postgres.sh STATE_DIR
# Needs Debian's postgresql (apt-get install postgresql). As root, the server
# runs as the `postgres` user (PostgreSQL refuses to run as root).
set -euo pipefail
STATE_DIR=$(mkdir -p "${1:?usage: start_postgres.sh STATE_DIR}" && cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
[ -x "$PG_BIN/initdb" ] || { echo "start_postgres.sh: initdb not found (apt-get install postgresql)" >&2; exit 3; }
PORT=${PGPORT_TEST:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
PASSWORD=$(python3 -c 'import secrets; print(secrets.token_hex(16))')

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
# The server's own files live where its user can reach them: STATE_DIR itself,
# or (as root, when STATE_DIR sits under a private directory such as pytest's
# /tmp/pytest-of-root) a fresh directory under /tmp, recorded in STATE_DIR/pg_dir.
PG_DIR=$STATE_DIR
if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$STATE_DIR"; then
  PG_DIR=$(mktemp -d /tmp/ablax-pg.XXXXXX)
fi
echo "$PG_DIR" > "$STATE_DIR/pg_dir"
mkdir -p "$PG_DIR/sock"
if [ "$(id -u)" = 0 ]; then chown postgres: "$PG_DIR" "$PG_DIR/sock"; fi

# Local socket connections trust the OS user; TCP needs the password (scram).
as_owner "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth-local=trust \
  --auth-host=scram-sha-256 -E UTF8 >"$STATE_DIR/initdb.log"
as_owner "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $PG_DIR/sock" start >/dev/null

# Passed in the environment (runuser keeps it), never on a command line.
export MLFLOW_DB_PASSWORD=$PASSWORD
as_owner "$REPO/deploy/mlflow_postgres/create_database.sh" -h "$PG_DIR/sock" -p "$PORT" -U postgres

URI="postgresql://mlflow:$PASSWORD@127.0.0.1:$PORT/mlflow"
printf 'export MLFLOW_BACKEND_STORE_URI=%q\nexport PGPORT_TEST=%q\n' "$URI" "$PORT" > "$STATE_DIR/env.sh"
chmod 600 "$STATE_DIR/env.sh"
echo "postgres ready on 127.0.0.1:$PORT (uri in $STATE_DIR/env.sh)"
