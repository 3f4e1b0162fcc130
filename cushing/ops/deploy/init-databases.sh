#!/bin/sh
# Creates the roles and databases the stack needs, one database per schema owner: MLflow's tracking/registry
# schema, MLflow's basic-auth schema and Optuna's schema clash if they share a database.
# Used by docker-compose (mounted into /docker-entrypoint-initdb.d) and by `cushing stack up` (run directly).
# Passwords come from *_FILE secrets (Docker) or from the environment.
set -eu
read_secret() { var="$1"; file_var="${1}_FILE"; eval "f=\${$file_var:-}"; if [ -n "$f" ]; then cat "$f"; else eval "printf '%s' \"\${$var:-}\""; fi; }
MLFLOW_DB_PASSWORD="$(read_secret MLFLOW_DB_PASSWORD)"
OPTUNA_DB_PASSWORD="$(read_secret OPTUNA_DB_PASSWORD)"
if [ -z "$MLFLOW_DB_PASSWORD" ] || [ -z "$OPTUNA_DB_PASSWORD" ]; then
  echo "init-databases: MLFLOW_DB_PASSWORD and OPTUNA_DB_PASSWORD must be set" >&2; exit 1
fi
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
  -v mlflow_pw="$MLFLOW_DB_PASSWORD" -v optuna_pw="$OPTUNA_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE ROLE optuna LOGIN PASSWORD :'optuna_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE optuna OWNER optuna;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow_auth FROM PUBLIC;
REVOKE ALL ON DATABASE optuna FROM PUBLIC;
SQL
