"""The production stack without Docker: a throwaway PostgreSQL cluster and a real `mlflow server` (basic-auth,
artifact proxy) on 127.0.0.1. Also the MLflow server launcher the docker-compose `mlflow` service runs, so both
paths start the server the same way.

Other accounts on the host get nothing: PostgreSQL asks every connection for a password (scram-sha-256, also on
its Unix socket, which sits in a folder only the postgres user can enter), database passwords never appear on a
command line (`ps` shows every process's arguments to every account): the server and the migration find them in a
libpq password file of mode 0600 (PGPASSFILE); the secrets, the environment file and the artifact store are 0600 /
0700. PostgreSQL refuses to run as root: when root, its commands run as the `postgres` user (runuser), and when
that user cannot reach the stack's folder (under root's home, mode 0700) the cluster lives in a private folder of
its own under /var/tmp instead.

Owns: `local` (`LocalStack`: up all or nothing, down, restart, its saved state), `postgres` (the cluster),
`server` (the MLflow server: command, environment, migration, the compose services' launcher), `credentials`
(admin password rules, owner-only files: pgpass, basic-auth settings), `processes` (ports, HTTP readiness, process
groups, `StackError`). It imports nothing of the package, neither torch nor mlflow (the server runs as a
process).
"""
from __future__ import annotations

from cushing.ops.stack.credentials import check_admin_password, write_auth_config, write_pgpass
from cushing.ops.stack.local import LocalStack, restart_saved, stop_saved
from cushing.ops.stack.postgres import Postgres
from cushing.ops.stack.processes import StackError, free_port, port_open, stop_group, wait_http
from cushing.ops.stack.server import MlflowServer, exec_mlflow_server, migrate, migrate_from_secrets, \
    mlflow_server_command, server_environment

__all__ = ["StackError", "check_admin_password", "Postgres", "MlflowServer", "LocalStack", "free_port",
           "wait_http", "mlflow_server_command", "write_auth_config", "write_pgpass", "stop_group", "stop_saved",
           "restart_saved", "port_open", "server_environment", "migrate", "exec_mlflow_server", "migrate_from_secrets"]
