"""The production stack without Docker: a throwaway PostgreSQL cluster and a real `mlflow server` (basic-auth,
artifact proxy) on 127.0.0.1, and the server launcher the docker-compose services run, so both paths start it the
same way. No other account on the host reaches the database, a secret or an artifact, and no password is ever on a
command line (`ps` shows them to every account).

Owns: `local` (`LocalStack`: up all or nothing, down, restart, saved state), `postgres`, `server` (command,
environment, migration, the compose launcher), `credentials` (password rules, owner-only files), `processes` (ports,
HTTP readiness, process groups, `StackError`). Imports only `cushing.private` of the package; neither torch nor
mlflow (the server runs as a process).
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
