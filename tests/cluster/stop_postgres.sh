#!/usr/bin/env bash
# Stops the server start_postgres.sh STATE_DIR started and removes its data.
set -uo pipefail
STATE_DIR=${1:?usage: stop_postgres.sh STATE_DIR}
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
PG_DIR=$(cat "$STATE_DIR/pg_dir" 2>/dev/null) || exit 0
if [ -f "$PG_DIR/data/postmaster.pid" ]; then
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null
  else
    "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null
  fi
fi
# Only a directory this set-up made under /tmp is removed; STATE_DIR is the caller's.
case "$PG_DIR" in /tmp/ablax-pg.*) rm -rf "$PG_DIR" ;; esac
exit 0
