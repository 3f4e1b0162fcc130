#!/bin/sh
# Creates the roles and databases the stack needs, one database per schema owner: MLflow's tracking/registry
# schema, MLflow's basic-auth schema and Optuna's schema clash if they share a database.
# Used by docker-compose (mounted into /docker-entrypoint-initdb.d) and by `cushing stack up` (run directly).
# Passwords come from *_FILE secrets (Docker) or from the environment, and reach psql through its environment
# (\getenv, psql 15 or later), never its arguments: `ps` shows every process's arguments to every account.
set -eu
read_secret() { var="$1"; file_var="${1}_FILE"; eval "f=\${$file_var:-}"; if [ -n "$f" ]; then cat "$f"; else eval "printf '%s' \"\${$var:-}\""; fi; }
cushing_mlflow_pw="$(read_secret MLFLOW_DB_PASSWORD)"
cushing_optuna_pw="$(read_secret OPTUNA_DB_PASSWORD)"
if [ -z "$cushing_mlflow_pw" ] || [ -z "$cushing_optuna_pw" ]; then
  echo "init-databases: MLFLOW_DB_PASSWORD and OPTUNA_DB_PASSWORD must be set" >&2; exit 1
fi
cushing_psql_major="$(psql --version | sed -n 's/^psql (PostgreSQL) \([0-9]*\).*/\1/p')"
if [ "${cushing_psql_major:-0}" -lt 15 ]; then
  echo "init-databases: needs psql 15 or later (\\getenv), found: $(psql --version)" >&2; exit 1
fi
# VERBOSITY terse: an error quotes no statement, so no password reaches the error output either
CUSHING_MLFLOW_PW="$cushing_mlflow_pw" CUSHING_OPTUNA_PW="$cushing_optuna_pw" \
  psql -v ON_ERROR_STOP=1 -v VERBOSITY=terse --no-psqlrc \
  --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" <<'SQL'
\getenv mlflow_pw CUSHING_MLFLOW_PW
\getenv optuna_pw CUSHING_OPTUNA_PW
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE ROLE optuna LOGIN PASSWORD :'optuna_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE optuna OWNER optuna;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow_auth FROM PUBLIC;
REVOKE ALL ON DATABASE optuna FROM PUBLIC;
SQL
unset cushing_mlflow_pw cushing_optuna_pw cushing_psql_major
