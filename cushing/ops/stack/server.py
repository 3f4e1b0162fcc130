"""The MLflow server with basic-auth and the artifact proxy: its command, its environment, the schema migration,
the server as a process of the local stack, and the launcher the docker-compose `mlflow` and `mlflow-migrate`
services run, so both paths start the server the same way. Database passwords reach it through a libpq password
file (PGPASSFILE), never its command line."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from cushing.ops.stack.credentials import check_admin_password, write_auth_config, write_pgpass
from cushing.ops.stack.processes import StackError, _group_is_ours, free_port, stop_group, wait_http

__all__ = ["mlflow_server_command", "server_environment", "migrate", "MlflowServer", "exec_mlflow_server",
           "migrate_from_secrets"]


def mlflow_server_command(*, backend_uri: str, artifacts: str, host: str, port: int, allowed_hosts: str,
                          workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--serve-artifacts",
            "--artifacts-destination", artifacts, "--host", host, "--port", str(port), "--workers", str(workers),
            "--app-name", "basic-auth", "--allowed-hosts", allowed_hosts]


# MLflow 3's server also starts a job runner with seven Huey consumers for its GenAI jobs (LLM judges, trace
# rollups), each a Python process importing MLflow: ~25 s of CPU at every start and ~1 GB of memory for features
# this service never calls. Off unless the environment turns it on (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true).
SERVER_ENV_DEFAULTS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_environment(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with this service's defaults for the MLflow server underneath what it sets itself."""
    return {**SERVER_ENV_DEFAULTS, **env}


def migrate(backend_uri: str, env: dict[str, str] | None = None) -> None:
    """`mlflow db upgrade`: the one-shot schema migration the server waits for."""
    r = subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", backend_uri], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise StackError(f"mlflow db upgrade failed: {r.stderr[-2000:]}")


@dataclass
class MlflowServer:
    base: Path
    backend_uri: str
    auth_db_uri: str
    admin_password: str
    port: int = 0
    host: str = "127.0.0.1"
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # CSRF key of the auth app
    workers: int = 2
    pgpass: Path | None = None
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.artifacts = self.base / "mlartifacts"
        self.log = self.base / "mlflow-server.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> "MlflowServer":
        check_admin_password(self.admin_password)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        os.chmod(self.artifacts, 0o700)  # other accounts cannot read the models and tables of the runs
        ini = write_auth_config(self.base / "basic_auth.ini", self.auth_db_uri)
        env = {**server_environment(os.environ), "MLFLOW_AUTH_CONFIG_PATH": str(ini),
               "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password, "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret_key,
               **({"PGPASSFILE": str(self.pgpass)} if self.pgpass else {})}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = mlflow_server_command(backend_uri=self.backend_uri, artifacts=str(self.artifacts), host=self.host,
                                    port=self.port, allowed_hosts=f"127.0.0.1:{self.port},localhost:{self.port}",
                                    workers=self.workers)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.log.chmod(0o600)
        wait_http(f"{self.url}/health", timeout, proc=self.proc, log=self.log)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None or _group_is_ours(self.proc.pid, self.base):  # its workers may outlive it
            stop_group(self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def client_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": "admin",
                "MLFLOW_TRACKING_PASSWORD": self.admin_password}


def _read(path: str | None, env: str) -> str:
    """A secret from its file (docker secrets), else from the environment."""
    return Path(path).read_text().strip() if path else os.environ.get(env, "")


def exec_mlflow_server(*, db_host: str, db_port: int, db_password_file: str | None, admin_password_file: str | None,
                       secret_key_file: str | None, artifacts: str, host: str, port: int, allowed_hosts: str,
                       workers: int = 4) -> None:
    """Replace this process with the MLflow server (the docker-compose `mlflow` service's command)."""
    admin = check_admin_password(_read(admin_password_file, "MLFLOW_ADMIN_PASSWORD"))
    key = _read(secret_key_file, "MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_urlsafe(32)
    folder = Path(tempfile.mkdtemp(prefix="mlflow-auth-"))
    pgpass = write_pgpass(folder / "pgpass", [(db_host, db_port, "mlflow",
                                               _read(db_password_file, "MLFLOW_DB_PASSWORD"))])
    ini = write_auth_config(folder / "basic_auth.ini", f"postgresql+psycopg2://mlflow@{db_host}:{db_port}/mlflow_auth")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": admin,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": key, "PGPASSFILE": str(pgpass)}
    cmd = mlflow_server_command(backend_uri=f"postgresql+psycopg2://mlflow@{db_host}:{db_port}/mlflow",
                                artifacts=artifacts, host=host, port=port, allowed_hosts=allowed_hosts, workers=workers)
    os.execve(cmd[0], cmd, server_environment(env))


def migrate_from_secrets(*, db_host: str, db_port: int, db_password_file: str | None) -> None:
    folder = Path(tempfile.mkdtemp(prefix="mlflow-migrate-"))
    pgpass = write_pgpass(folder / "pgpass", [(db_host, db_port, "mlflow",
                                               _read(db_password_file, "MLFLOW_DB_PASSWORD"))])
    try:
        migrate(f"postgresql+psycopg2://mlflow@{db_host}:{db_port}/mlflow", {"PGPASSFILE": str(pgpass)})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
