#!/usr/bin/env bash
# Starts a shared MLflow tracking server on a PostgreSQL backend store.
#
# Usage: deploy/mlflow_postgres/start_server.sh
# Environment (see README.md next to this file):
#   MLFLOW_BACKEND_STORE_URI  required, postgresql://USER:PASSWORD@HOST:PORT/DB
#   MLFLOW_ARTIFACTS          where artifacts go: a directory, s3://..., gs://... (default ./mlartifacts)
#   MLFLOW_ARTIFACTS_MODE     proxy (default): clients upload through the server, so compute
#                             nodes need only HTTP access; direct: clients write to
#                             MLFLOW_ARTIFACTS themselves (shared filesystem or bucket credentials)
#   MLFLOW_HOST               interface to bind (default 127.0.0.1: this machine only)
#   MLFLOW_PORT               default 5000
#   MLFLOW_WORKERS            server worker processes (default 4)
#   MLFLOW_AUTH               none (default) or basic: MLflow's basic-auth app; needs
#                             MLFLOW_AUTH_ADMIN_PASSWORD on first start, and
#                             MLFLOW_FLASK_SERVER_SECRET_KEY (see README.md); users live in
#                             MLFLOW_AUTH_DATABASE_URI (default sqlite in MLFLOW_SERVER_DIR)
#   MLFLOW_ALLOWED_HOSTS      Host headers accepted when bound beyond localhost
#   MLFLOW_SERVER_DIR         pid file and log (default ./mlflow-server)
#   MLFLOW_FOREGROUND=1       run in the foreground (systemd, containers)
# Stop: kill "$(cat "$MLFLOW_SERVER_DIR/server.pid")"  (the server's process group)
set -euo pipefail
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI=postgresql://USER:PASSWORD@HOST:PORT/DB}"
ARTIFACTS=${MLFLOW_ARTIFACTS:-$PWD/mlartifacts}
MODE=${MLFLOW_ARTIFACTS_MODE:-proxy}
HOST=${MLFLOW_HOST:-127.0.0.1}
PORT=${MLFLOW_PORT:-5000}
WORKERS=${MLFLOW_WORKERS:-4}
AUTH=${MLFLOW_AUTH:-none}
SERVER_DIR=${MLFLOW_SERVER_DIR:-$PWD/mlflow-server}
MLFLOW=${MLFLOW_BIN:-$(command -v mlflow || echo "$(dirname "$0")/../../.venv/bin/mlflow")}

# SQLAlchemy 2.1 maps postgresql:// to the psycopg (3) driver; postgresql+psycopg2://
# selects the older psycopg2 instead.
case "$MLFLOW_BACKEND_STORE_URI" in
  postgresql://*|postgresql+psycopg://*) driver=psycopg ;;
  postgresql+psycopg2://*) driver=psycopg2 ;;
  *) echo "start_server.sh: MLFLOW_BACKEND_STORE_URI must be postgresql://..." >&2; exit 2 ;;
esac
python_bin=$(dirname "$MLFLOW")/python
[ -x "$python_bin" ] || python_bin=python3
"$python_bin" -c "import $driver" 2>/dev/null || {
  echo "start_server.sh: the PostgreSQL driver $driver is missing: pip install 'psycopg[binary]'" >&2
  exit 2
}

# The store URI holds the database password: `mlflow server` reads it from
# MLFLOW_BACKEND_STORE_URI (exported), never from its argv, which `ps` shows to everyone.
export MLFLOW_BACKEND_STORE_URI
args=(server --host "$HOST" --port "$PORT" --workers "$WORKERS")
case "$MODE" in
  proxy) args+=(--serve-artifacts --artifacts-destination "$ARTIFACTS") ;;
  direct) args+=(--no-serve-artifacts --default-artifact-root "$ARTIFACTS") ;;
  *) echo "start_server.sh: MLFLOW_ARTIFACTS_MODE is proxy or direct" >&2; exit 2 ;;
esac
case "$AUTH" in
  none) ;;
  basic)
    : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?basic auth needs MLFLOW_FLASK_SERVER_SECRET_KEY (a long random string)}"
    if [ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
      # Users and permissions live in their own store (MLflow's basic_auth.ini
      # default is a sqlite file in the working directory); keep it with the server.
      mkdir -p "$SERVER_DIR"
      export MLFLOW_AUTH_CONFIG_PATH="$SERVER_DIR/basic_auth.ini"
      # Its database_uri may hold a password: readable by this user only.
      (umask 077; : > "$MLFLOW_AUTH_CONFIG_PATH")
      cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$SERVER_DIR/basic_auth.db}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
    fi
    "$python_bin" -c 'import flask_wtf' 2>/dev/null || {
      echo "start_server.sh: basic auth needs Flask-WTF: pip install 'mlflow[auth]'" >&2
      exit 2
    }
    args+=(--app-name basic-auth) ;;
  *) echo "start_server.sh: MLFLOW_AUTH is none or basic" >&2; exit 2 ;;
esac
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"); fi
if [ "$HOST" != 127.0.0.1 ] && [ "$HOST" != localhost ] && [ "$AUTH" = none ]; then
  echo "start_server.sh: warning: bound to $HOST without authentication; anyone who reaches" \
       "this port can read and delete runs (see README.md, Authentication)" >&2
fi

export MLFLOW_DISABLE_TELEMETRY=true
# The server's background job runner is not used by ablax and would outlive a stop.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
mkdir -p "$SERVER_DIR"
if [ "${MLFLOW_FOREGROUND:-0}" = 1 ]; then
  exec "$MLFLOW" "${args[@]}"
fi
# Own session, so one kill of the process group stops the server and its workers.
setsid "$MLFLOW" "${args[@]}" >>"$SERVER_DIR/server.log" 2>&1 < /dev/null &
echo $! > "$SERVER_DIR/server.pid"
for _ in $(seq 1 240); do
  if curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 \
      || python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null; then
    echo "mlflow server up: http://$HOST:$PORT (pid $(cat "$SERVER_DIR/server.pid"), log $SERVER_DIR/server.log)"
    exit 0
  fi
  kill -0 "$(cat "$SERVER_DIR/server.pid")" 2>/dev/null || { tail -n 30 "$SERVER_DIR/server.log" >&2; exit 1; }
  sleep 0.5
done
echo "start_server.sh: no answer on port $PORT after 120 s; log: $SERVER_DIR/server.log" >&2
exit 1
