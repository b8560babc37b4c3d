#!/usr/bin/env bash
# Stops the server start_postgres.sh STATE_DIR started.
set -uo pipefail
STATE_DIR=${1:?usage: stop_postgres.sh STATE_DIR}
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
[ -f "$STATE_DIR/data/postmaster.pid" ] || exit 0
if [ "$(id -u)" = 0 ]; then
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$STATE_DIR/data" -m fast -w stop >/dev/null
else
  "$PG_BIN/pg_ctl" -D "$STATE_DIR/data" -m fast -w stop >/dev/null
fi
