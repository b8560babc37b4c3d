#!/usr/bin/env bash
# Creates the PostgreSQL role and database that `mlflow server` stores runs in.
#
# Usage: MLFLOW_DB_PASSWORD=... deploy/mlflow_postgres/create_database.sh [psql connection args]
#   e.g. sudo -u postgres env MLFLOW_DB_PASSWORD=... deploy/mlflow_postgres/create_database.sh
#        MLFLOW_DB_PASSWORD=... deploy/mlflow_postgres/create_database.sh -h db.internal -U admin
#
# Environment: MLFLOW_DB_NAME (default mlflow), MLFLOW_DB_USER (default mlflow),
# MLFLOW_DB_PASSWORD (required; never put it on a command line, where `ps` shows it).
# Idempotent: an existing role gets the new password, an existing database is kept.
# MLflow creates its tables itself on the server's first start.
set -euo pipefail
DB=${MLFLOW_DB_NAME:-mlflow}
USER_NAME=${MLFLOW_DB_USER:-mlflow}
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}"

# psql variables (:'name') quote the values, so no password reaches SQL unescaped.
# The password reaches psql through its environment: `\set` runs `printenv`, whose
# command line names the variable, not its value (`-v password=...` would put it in
# psql's argv for `ps` to show).
export MLFLOW_DB_PASSWORD
psql -v ON_ERROR_STOP=1 -q -d postgres "$@" -v db="$DB" -v user="$USER_NAME" <<'SQL'
\set password `printenv MLFLOW_DB_PASSWORD`
SELECT format('CREATE ROLE %I LOGIN', :'user')
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') \gexec
ALTER ROLE :"user" WITH LOGIN PASSWORD :'password';
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'user')
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SQL
echo "database $DB ready for role $USER_NAME"
