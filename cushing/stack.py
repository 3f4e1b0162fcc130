"""The production stack without Docker: a throwaway PostgreSQL cluster and a real `mlflow server` (basic-auth,
artifact proxy) on 127.0.0.1. Also the MLflow server launcher the docker-compose `mlflow` service runs, so both
paths start the server the same way.

PostgreSQL refuses to run as root: when root, its commands run as the `postgres` user (runuser).
"""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["StackError", "check_admin_password", "Postgres", "MlflowServer", "LocalStack", "free_port",
           "wait_http", "mlflow_server_command", "write_auth_config"]

INIT_SCRIPT = Path(__file__).with_name("deploy") / "init-databases.sh"
# Known defaults and placeholders: MLflow's old default, .env.example's placeholder, the obvious ones.
DEFAULT_PASSWORDS = {"password1234", "password", "admin", "changeme", "change-me", "change_me", "mlflow",
                     "CHANGE-ME-admin-password"}
MIN_PASSWORD_LENGTH = 12


class StackError(RuntimeError):
    pass


def check_admin_password(password: str | None) -> str:
    if not password:
        raise StackError("no MLflow admin password: set MLFLOW_ADMIN_PASSWORD (in .env for docker compose)")
    if password in DEFAULT_PASSWORDS or password.lower().startswith("change"):
        raise StackError("refusing to start with a default admin password: set a real MLFLOW_ADMIN_PASSWORD in .env")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise StackError(f"the MLflow admin password must have at least {MIN_PASSWORD_LENGTH} characters")
    return password


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, ok=(200,), proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise StackError(f"process exited with {proc.returncode} before {url} answered\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status in ok:
                    return
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return
            last = str(e)
        except OSError as e:
            last = str(e)
        time.sleep(0.5)
    raise StackError(f"{url} did not answer within {timeout:.0f}s ({last})")


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    on_path = shutil.which(name)
    if on_path:
        return on_path
    raise StackError(f"PostgreSQL's {name} was not found: install Debian's postgresql (apt-get install postgresql)")


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    return [runuser, "-u", "postgres", "--", *cmd] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c",
                                                                   " ".join(cmd)]


@dataclass
class Postgres:
    """A throwaway cluster listening on 127.0.0.1:port only."""

    base: Path
    port: int = 0
    superuser_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.data = self.base / "pgdata"
        self.sock = self.base / "sock"
        self.log = self.base / "postgres.log"

    def _own(self, *paths: Path) -> None:
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            for p in paths:
                os.chown(p, pw.pw_uid, pw.pw_gid)

    def start(self) -> "Postgres":
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)  # the postgres user must reach its folders
        for d in (self.data, self.sock):
            d.mkdir(exist_ok=True)
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.superuser_password)
        self.log.touch()
        self._own(self.data, self.sock, pwfile, self.log)
        os.chmod(self.data, 0o700)
        subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
                                     "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]),
                       check=True, capture_output=True, text=True)
        pwfile.unlink()
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sock}"
        r = subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts,
                                         "-w", "-t", "60", "start"]), capture_output=True, text=True)
        if r.returncode != 0:
            raise StackError(f"PostgreSQL did not start: {r.stderr}\n{self.log.read_text()[-2000:]}")
        return self

    def env(self) -> dict[str, str]:
        return {"PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": "postgres",
                "PGPASSWORD": self.superuser_password}

    def init_databases(self, mlflow_password: str, optuna_password: str) -> None:
        env = {**os.environ, **self.env(), "MLFLOW_DB_PASSWORD": mlflow_password, "OPTUNA_DB_PASSWORD": optuna_password}
        r = subprocess.run(["sh", str(INIT_SCRIPT)], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise StackError(f"creating databases failed: {r.stderr}")

    def uri(self, db: str, user: str, password: str, driver: str = "postgresql+psycopg2") -> str:
        from urllib.parse import quote

        return f"{driver}://{user}:{quote(password, safe='')}@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]),
                           capture_output=True, text=True)


def write_auth_config(path: Path, database_uri: str, default_permission: str = "NO_PERMISSIONS") -> Path:
    """MLflow basic-auth settings; the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD, not the file."""
    path.write_text("[mlflow]\n"
                    f"default_permission = {default_permission}\n"
                    f"database_uri = {database_uri.replace('%', '%%')}\n"
                    "admin_username = admin\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                    # PBKDF2 costs ~1 s per request on a small CPU: cache verified credentials per worker for a
                    # minute (a changed password takes up to that long to reach every worker)
                    "auth_cache_ttl_seconds = 60\n")
    os.chmod(path, 0o600)
    return path


def mlflow_server_command(*, backend_uri: str, artifacts: str, host: str, port: int, allowed_hosts: str,
                          workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--serve-artifacts",
            "--artifacts-destination", artifacts, "--host", host, "--port", str(port), "--workers", str(workers),
            "--app-name", "basic-auth", "--allowed-hosts", allowed_hosts]


def migrate(backend_uri: str) -> None:
    """`mlflow db upgrade`: the one-shot schema migration the server waits for."""
    r = subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", backend_uri], capture_output=True, text=True)
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
        ini = write_auth_config(self.base / "basic_auth.ini", self.auth_db_uri)
        env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret_key}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = mlflow_server_command(backend_uri=self.backend_uri, artifacts=str(self.artifacts), host=self.host,
                                    port=self.port, allowed_hosts=f"127.0.0.1:{self.port},localhost:{self.port}",
                                    workers=self.workers)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.url}/health", timeout, proc=self.proc, log=self.log)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def client_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": "admin",
                "MLFLOW_TRACKING_PASSWORD": self.admin_password}


@dataclass
class LocalStack:
    """PostgreSQL + migrated schema + `mlflow server` with basic-auth, all on loopback."""

    base: Path | None = None
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    mlflow_db_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    optuna_db_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    pg_port: int = 0
    port: int = 0
    workers: int = 2  # uvicorn workers of the MLflow server

    def __post_init__(self) -> None:
        # not under a 0700 folder (pytest's tmp): the postgres user must be able to reach the cluster
        self.base = Path(self.base) if self.base else Path(tempfile.mkdtemp(prefix="cushing-stack-"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.pg = Postgres(self.base, self.pg_port)
        self.server: MlflowServer | None = None

    @property
    def optuna_storage(self) -> str:
        return self.pg.uri("optuna", "optuna", self.optuna_db_password, driver="postgresql+psycopg2")

    def start(self) -> "LocalStack":
        check_admin_password(self.admin_password)
        self.pg.start()
        self.pg.init_databases(self.mlflow_db_password, self.optuna_db_password)
        backend = self.pg.uri("mlflow", "mlflow", self.mlflow_db_password)
        migrate(backend)
        self.server = MlflowServer(self.base, backend, self.pg.uri("mlflow_auth", "mlflow", self.mlflow_db_password),
                                   self.admin_password, self.port, workers=self.workers).start()
        return self

    def stop(self, remove: bool = True) -> None:
        if self.server:
            self.server.stop()
        self.pg.stop()
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)

    def save_state(self) -> Path:
        """What `cushing stack down` needs to stop a stack started by `cushing stack up`."""
        import json

        assert self.server is not None and self.server.proc is not None
        path = self.base / "stack.json"
        path.write_text(json.dumps({"server_pid": self.server.proc.pid, "pgdata": str(self.pg.data),
                                    "url": self.server.url, "pg_port": self.pg.port}))
        os.chmod(path, 0o600)
        return path

    def env(self) -> dict[str, str]:
        assert self.server is not None
        return {**self.server.client_env(), "CUSHING_OPTUNA_STORAGE": self.optuna_storage}

    def write_env_file(self) -> Path:
        path = self.base / "env.sh"
        path.write_text("".join(f"export {k}='{v}'\n" for k, v in self.env().items()))
        os.chmod(path, 0o600)
        return path


def stop_saved(base: Path) -> None:
    """Stop a stack that `cushing stack up` left running in `base`."""
    import json

    state = json.loads((base / "stack.json").read_text())
    try:
        os.killpg(int(state["server_pid"]), signal.SIGTERM)
    except ProcessLookupError:
        pass
    subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", state["pgdata"], "-m", "fast", "-w", "stop"]),
                   capture_output=True, text=True)


def _read(path: str | None, env: str) -> str:
    if path:
        return Path(path).read_text().strip()
    return os.environ.get(env, "")


def exec_mlflow_server(*, db_host: str, db_port: int, db_password_file: str | None, admin_password_file: str | None,
                       secret_key_file: str | None, artifacts: str, host: str, port: int, allowed_hosts: str,
                       workers: int = 4) -> None:
    """Replace this process with the MLflow server (the docker-compose `mlflow` service's command)."""
    from urllib.parse import quote

    admin = check_admin_password(_read(admin_password_file, "MLFLOW_ADMIN_PASSWORD"))
    db_pw = quote(_read(db_password_file, "MLFLOW_DB_PASSWORD"), safe="")
    key = _read(secret_key_file, "MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_urlsafe(32)
    ini = write_auth_config(Path(tempfile.mkdtemp(prefix="mlflow-auth-")) / "basic_auth.ini",
                            f"postgresql+psycopg2://mlflow:{db_pw}@{db_host}:{db_port}/mlflow_auth")
    os.environ.update({"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": admin,
                       "MLFLOW_FLASK_SERVER_SECRET_KEY": key})
    cmd = mlflow_server_command(backend_uri=f"postgresql+psycopg2://mlflow:{db_pw}@{db_host}:{db_port}/mlflow",
                                artifacts=artifacts, host=host, port=port, allowed_hosts=allowed_hosts, workers=workers)
    os.execv(cmd[0], cmd)


def migrate_from_secrets(*, db_host: str, db_port: int, db_password_file: str | None) -> None:
    from urllib.parse import quote

    db_pw = quote(_read(db_password_file, "MLFLOW_DB_PASSWORD"), safe="")
    migrate(f"postgresql+psycopg2://mlflow:{db_pw}@{db_host}:{db_port}/mlflow")
