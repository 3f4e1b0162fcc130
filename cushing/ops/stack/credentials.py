"""The stack's secrets: admin passwords refused when they are defaults or short, and files only their owner can
read (created with that mode): libpq password files, MLflow's basic-auth settings."""
from __future__ import annotations

from pathlib import Path

from cushing.ops.stack.processes import StackError
from cushing.private import write_private

__all__ = ["check_admin_password", "write_pgpass", "write_auth_config", "SECRET_KEYS"]


# Known defaults and placeholders: MLflow's old default, .env.example's placeholder, the obvious ones.
DEFAULT_PASSWORDS = {"password1234", "password", "admin", "changeme", "change-me", "change_me", "mlflow",
                     "CHANGE-ME-admin-password"}
MIN_PASSWORD_LENGTH = 12
SECRET_KEYS = ("admin_password", "mlflow_db_password", "optuna_db_password", "secret_key", "superuser_password")


def check_admin_password(password: str | None) -> str:
    if not password:
        raise StackError("no MLflow admin password: set MLFLOW_ADMIN_PASSWORD (in .env for docker compose)")
    if password in DEFAULT_PASSWORDS or password.lower().startswith("change"):
        raise StackError("refusing to start with a default admin password: set a real MLFLOW_ADMIN_PASSWORD in .env")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise StackError(f"the MLflow admin password must have at least {MIN_PASSWORD_LENGTH} characters")
    return password


def write_pgpass(path: Path, entries: list[tuple[str, int, str, str]]) -> Path:
    """A libpq password file (host, port, user, password; any database), mode 0600 as libpq requires."""
    esc = lambda v: str(v).replace("\\", "\\\\").replace(":", "\\:")  # noqa: E731
    return write_private(path, "".join(f"{esc(h)}:{p}:*:{esc(u)}:{esc(pw)}\n" for h, p, u, pw in entries))


def write_auth_config(path: Path, database_uri: str, default_permission: str = "NO_PERMISSIONS") -> Path:
    """MLflow basic-auth settings; the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD, not the file."""
    return write_private(path, "[mlflow]\n"
                          f"default_permission = {default_permission}\n"
                          f"database_uri = {database_uri.replace('%', '%%')}\n"
                          "admin_username = admin\n"
                          "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                          # PBKDF2 costs ~1 s per request on a small CPU: cache verified credentials per worker
                          # for a minute (a changed password takes up to that long to reach every worker)
                          "auth_cache_ttl_seconds = 60\n")
