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
"""
from __future__ import annotations

import glob
import json
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
from typing import Mapping

__all__ = ["StackError", "check_admin_password", "Postgres", "MlflowServer", "LocalStack", "free_port",
           "wait_http", "mlflow_server_command", "write_auth_config", "write_pgpass", "stop_group", "stop_saved",
           "restart_saved"]

INIT_SCRIPT = Path(__file__).with_name("deploy") / "init-databases.sh"
# Known defaults and placeholders: MLflow's old default, .env.example's placeholder, the obvious ones.
DEFAULT_PASSWORDS = {"password1234", "password", "admin", "changeme", "change-me", "change_me", "mlflow",
                     "CHANGE-ME-admin-password"}
MIN_PASSWORD_LENGTH = 12
SECRET_KEYS = ("admin_password", "mlflow_db_password", "optuna_db_password", "secret_key", "superuser_password")


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


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


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


def _private(path: Path, mode: int = 0o600) -> Path:
    os.chmod(path, mode)
    return path


def _write_private(path: Path, text: str) -> Path:
    """A file only its owner can read, created with that mode (never readable, even for an instant)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return _private(path)


def write_pgpass(path: Path, entries: list[tuple[str, int, str, str]]) -> Path:
    """A libpq password file (host, port, user, password; any database), mode 0600 as libpq requires."""
    esc = lambda v: str(v).replace("\\", "\\\\").replace(":", "\\:")  # noqa: E731
    return _write_private(path, "".join(f"{esc(h)}:{p}:*:{esc(u)}:{esc(pw)}\n" for h, p, u, pw in entries))


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


def _postgres_can_enter(path: Path) -> bool:
    if os.geteuid() != 0:
        return True
    return subprocess.run(_as_postgres(["test", "-x", str(path)]), capture_output=True).returncode == 0


@dataclass
class Postgres:
    """A throwaway cluster listening on 127.0.0.1:port, password required for every connection."""

    base: Path
    port: int = 0
    superuser_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    root: Path | None = None  # where the cluster lives (default: base/pg, or /var/tmp when postgres cannot reach it)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    @property
    def data(self) -> Path:
        return self.root / "pgdata"

    @property
    def sock(self) -> Path:
        return self.root / "sock"

    def _place(self) -> None:
        """base/pg when the postgres user can reach base (base is made traversable, not listable, for it);
        otherwise a private folder of its own under /var/tmp (root's home is 0700)."""
        if self.root is not None:
            return
        if os.geteuid() == 0:
            os.chmod(self.base, 0o711)
        if _postgres_can_enter(self.base):
            self.root = self.base / "pg"
            self.root.mkdir(exist_ok=True)
        else:
            self.root = Path(tempfile.mkdtemp(prefix="cushing-pg-", dir="/var/tmp"))
        self._own(self.root)
        os.chmod(self.root, 0o700)

    def _own(self, *paths: Path) -> None:
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            for p in paths:
                os.chown(p, pw.pw_uid, pw.pw_gid)

    def start(self) -> "Postgres":
        self.base.mkdir(parents=True, exist_ok=True)
        self._place()
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        return self.launch()

    def _initdb(self) -> None:
        for d in (self.data, self.sock):
            d.mkdir(exist_ok=True)
        pwfile = self.root / "pwfile"
        _write_private(pwfile, self.superuser_password)
        self._own(self.data, self.sock, pwfile)
        os.chmod(self.data, 0o700)
        os.chmod(self.sock, 0o700)
        r = subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
                                         "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                                         f"--pwfile={pwfile}"]), capture_output=True, text=True)
        pwfile.unlink(missing_ok=True)
        if r.returncode != 0:
            raise StackError(f"initdb failed in {self.data}: {r.stderr.strip()[-1500:]}")

    def launch(self) -> "Postgres":
        self.log.touch()
        self._own(self.log)
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sock} "
                "-c unix_socket_permissions=0700")
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

    def uri(self, db: str, user: str, driver: str = "postgresql+psycopg2") -> str:
        """Without the password: libpq finds it in PGPASSFILE, so no command line ever carries it."""
        return f"{driver}://{user}@127.0.0.1:{self.port}/{db}"

    def running(self) -> bool:
        r = subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "status"]), capture_output=True)
        return r.returncode == 0

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]),
                           capture_output=True, text=True)


def write_auth_config(path: Path, database_uri: str, default_permission: str = "NO_PERMISSIONS") -> Path:
    """MLflow basic-auth settings; the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD, not the file."""
    return _write_private(path, "[mlflow]\n"
                          f"default_permission = {default_permission}\n"
                          f"database_uri = {database_uri.replace('%', '%%')}\n"
                          "admin_username = admin\n"
                          "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                          # PBKDF2 costs ~1 s per request on a small CPU: cache verified credentials per worker
                          # for a minute (a changed password takes up to that long to reach every worker)
                          "auth_cache_ttl_seconds = 60\n")


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
        _private(self.log)
        wait_http(f"{self.url}/health", timeout, proc=self.proc, log=self.log)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None or _group_is_ours(self.proc.pid, self.base):  # its workers may outlive it
            stop_group(self.proc.pid)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def client_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": "admin",
                "MLFLOW_TRACKING_PASSWORD": self.admin_password}


def stop_group(pgid: int, grace: float = 20.0) -> bool:
    """SIGTERM a process group, SIGKILL what is left after `grace` seconds; True when it is gone (also when it was
    gone already). Only for a group this process started or has checked is its own (`_group_is_ours`). A member
    that exited but was not yet reaped (a zombie: the leader is often the caller's own child) counts as gone."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.time() + grace
    while time.time() < deadline:
        if not _group_members(pgid, live=True):
            return True
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    deadline = time.time() + 5
    while _group_members(pgid, live=True):
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


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
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    superuser_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    pg_root: Path | None = None

    def __post_init__(self) -> None:
        self.base = Path(self.base) if self.base else Path(tempfile.mkdtemp(prefix="cushing-stack-"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.pg = Postgres(self.base, self.pg_port, self.superuser_password, self.pg_root)
        self.server: MlflowServer | None = None

    @property
    def pgpass(self) -> Path:
        return self.base / "pgpass"

    @property
    def optuna_storage(self) -> str:
        return self.pg.uri("optuna", "optuna")

    def storage_for(self, database: str) -> str:
        """An Optuna storage URL for another database of this cluster, owned by the optuna role."""
        return self.pg.uri(database, "optuna")

    def _server(self) -> MlflowServer:
        return MlflowServer(self.base, self.pg.uri("mlflow", "mlflow"), self.pg.uri("mlflow_auth", "mlflow"),
                            self.admin_password, self.port, secret_key=self.secret_key, workers=self.workers,
                            pgpass=self.pgpass)

    def start(self) -> "LocalStack":
        """All or nothing: when a step fails, what this call started is stopped and a cluster it made is removed
        (a retry in the same folder starts clean); an older cluster stays, stopped, with its secrets and the
        stack.json that `cushing stack down|restart` need. Written before the cluster exists, stack.json also lets
        `down` clean up after an `up` that was killed part-way."""
        check_admin_password(self.admin_password)
        self.port = self.port or free_port()
        if port_open(self.port):
            raise StackError(f"port {self.port} on 127.0.0.1 is already in use, so the MLflow server cannot listen "
                             "there: stop what listens on it or choose another port (--port)")
        existed = self._cluster_exists()
        self._load_or_save_secrets(existed)
        self.pg.base.mkdir(parents=True, exist_ok=True)
        self.pg._place()
        self._save_state(server_pgid=None)
        try:
            self.pg.start()
            write_pgpass(self.pgpass, [("127.0.0.1", self.pg.port, "mlflow", self.mlflow_db_password),
                                       ("127.0.0.1", self.pg.port, "optuna", self.optuna_db_password)])
            if not existed:
                self.pg.init_databases(self.mlflow_db_password, self.optuna_db_password)
            migrate(self.pg.uri("mlflow", "mlflow"), {"PGPASSFILE": str(self.pgpass)})
            self.server = self._server()
            try:
                self.server.start()
            except StackError as e:
                raise StackError(f"the MLflow server did not start on 127.0.0.1:{self.port}: {e}") from None
        except BaseException:
            self._abandon(remove_cluster=not existed)
            raise
        return self

    def _cluster_exists(self) -> bool:
        return ((self.pg.root or self.base / "pg") / "pgdata" / "PG_VERSION").exists()

    def _load_or_save_secrets(self, existed: bool) -> None:
        """An existing cluster keeps the passwords its roles were made with (new ones would lock the migration
        and the server out of it); a new cluster's are saved before it is made."""
        path = self.base / "secrets.json"
        if not existed:
            self._save_secrets()
            return
        if not path.exists():
            raise StackError(f"{self.base} holds a PostgreSQL cluster but not its passwords ({path} is missing), "
                             f"so nothing can log into it: remove {self.base} or choose another --dir")
        saved = json.loads(path.read_text())
        for key in SECRET_KEYS:
            setattr(self, key, saved[key])
        self.pg.superuser_password = self.superuser_password

    def _abandon(self, remove_cluster: bool) -> None:
        """Undo a start that failed part-way (see `start`)."""
        if self.server is not None:
            self.server.stop()
        self.pg.stop()
        if not remove_cluster or (self.pg.data.exists() and self.pg.running()):
            return  # an older cluster, or one that did not stop: `cushing stack down` finds it in stack.json
        if self.pg.root is not None:
            shutil.rmtree(self.pg.root, ignore_errors=True)
        for name in ("stack.json", "secrets.json", "pgpass", "basic_auth.ini"):
            (self.base / name).unlink(missing_ok=True)

    def stop(self, remove: bool = True) -> None:
        if self.server:
            self.server.stop()
        self.pg.stop()
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)
            if self.pg.root and not str(self.pg.root).startswith(str(self.base)):
                shutil.rmtree(self.pg.root, ignore_errors=True)

    def save_state(self) -> Path:
        """What `cushing stack down|restart` need: processes and ports (stack.json) and the secrets (0600)."""
        assert self.server is not None and self.server.proc is not None
        self._save_secrets()
        return self._save_state(server_pgid=self.server.proc.pid)

    def _save_state(self, server_pgid: int | None) -> Path:
        return _write_private(self.base / "stack.json", json.dumps({
            "server_pgid": server_pgid, "pg_root": str(self.pg.root), "url": f"http://127.0.0.1:{self.port}",
            "port": self.port, "pg_port": self.pg.port, "workers": self.workers}))

    def _save_secrets(self) -> Path:
        return _write_private(self.base / "secrets.json", json.dumps({k: getattr(self, k) for k in SECRET_KEYS}))

    @classmethod
    def from_saved(cls, base: Path) -> "LocalStack":
        state = json.loads((base / "stack.json").read_text())
        keys = json.loads((base / "secrets.json").read_text())
        return cls(base=base, pg_port=state["pg_port"], port=state["port"], workers=state.get("workers", 2),
                   pg_root=Path(state["pg_root"]), **keys)

    def env(self) -> dict[str, str]:
        assert self.server is not None
        return {**self.server.client_env(), "CUSHING_OPTUNA_STORAGE": self.optuna_storage,
                "PGPASSFILE": str(self.pgpass)}

    def write_env_file(self) -> Path:
        return _write_private(self.base / "env.sh", "".join(f"export {k}='{v}'\n" for k, v in self.env().items()))


def _listeners(port: int) -> set[int]:
    """Pids of processes with a socket listening on 127.0.0.1:port (from /proc, no tools needed)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(parts[9])
    pids = set()
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            pids.add(int(fd.split("/")[2]))
    return pids


def _ours(pid: int, base: Path) -> bool:
    """A server of this stack: its command line names the stack's artifact store, or its environment the stack's
    auth config (uvicorn's workers get it through the environment). False for a process that is gone or that
    this account cannot inspect."""
    proc = Path(f"/proc/{pid}")
    try:
        args = (proc / "cmdline").read_bytes().split(b"\0")
        env = (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return (str(base / "mlartifacts").encode() in args
            or f"MLFLOW_AUTH_CONFIG_PATH={base / 'basic_auth.ini'}".encode() in env)


def _group_members(pgid: int, live: bool = False) -> list[int]:
    """Pids of the processes in process group `pgid`, with `live` only those still running (not zombies), from
    /proc/PID/stat: pid (comm) state ppid pgrp ..."""
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        state, _, pgrp = text[text.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and not (live and state in "ZX"):
            pids.append(int(stat.split("/")[2]))
    return pids


def _group_is_ours(pgid: int, base: Path) -> bool:
    """A saved process group id is only a number: after a reboot or a long while it may be another program's
    (and `stack down` may run as root). It is this stack's when one of its processes is (`_ours`)."""
    return pgid > 0 and any(_ours(pid, base) for pid in _group_members(pgid))


def stop_saved(base: Path) -> list[str]:
    """Stop everything a `cushing stack up` in `base` started: the server's process group, any process still
    listening on its port (a server restarted since), PostgreSQL. Returns what could not be stopped."""
    state = json.loads((base / "stack.json").read_text())
    problems = []
    pgid = int(state.get("server_pgid") or state.get("server_pid") or 0)
    if _group_is_ours(pgid, base):
        stop_group(pgid)
    for pid in _listeners(int(state["port"])):
        try:
            if _ours(pid, base):
                stop_group(os.getpgid(pid))
        except OSError:
            pass
    if port_open(int(state["port"])):
        problems.append(f"something still listens on 127.0.0.1:{state['port']}")
    pg = Postgres(base, int(state["pg_port"]), root=Path(state["pg_root"]))
    pg.stop()
    if pg.data.exists() and pg.running():
        problems.append(f"PostgreSQL in {pg.data} is still running")
    return problems


def restart_saved(base: Path) -> LocalStack:
    """Stop and start the stack of `base` again with the same data, ports and passwords."""
    problems = stop_saved(base)
    if problems:
        raise StackError("could not stop the running stack: " + "; ".join(problems))
    s = LocalStack.from_saved(base)
    s.start()
    s.save_state()
    s.write_env_file()
    return s


def _read(path: str | None, env: str) -> str:
    if path:
        return Path(path).read_text().strip()
    return os.environ.get(env, "")


def exec_mlflow_server(*, db_host: str, db_port: int, db_password_file: str | None, admin_password_file: str | None,
                       secret_key_file: str | None, artifacts: str, host: str, port: int, allowed_hosts: str,
                       workers: int = 4) -> None:
    """Replace this process with the MLflow server (the docker-compose `mlflow` service's command). The database
    password goes into a private libpq password file, not the server's command line."""
    admin = check_admin_password(_read(admin_password_file, "MLFLOW_ADMIN_PASSWORD"))
    key = _read(secret_key_file, "MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_urlsafe(32)
    folder = Path(tempfile.mkdtemp(prefix="mlflow-auth-"))
    pgpass = write_pgpass(folder / "pgpass", [(db_host, db_port, "mlflow",
                                               _read(db_password_file, "MLFLOW_DB_PASSWORD"))])
    ini = write_auth_config(folder / "basic_auth.ini", f"postgresql+psycopg2://mlflow@{db_host}:{db_port}/mlflow_auth")
    os.environ.update({"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": admin,
                       "MLFLOW_FLASK_SERVER_SECRET_KEY": key, "PGPASSFILE": str(pgpass)})
    cmd = mlflow_server_command(backend_uri=f"postgresql+psycopg2://mlflow@{db_host}:{db_port}/mlflow",
                                artifacts=artifacts, host=host, port=port, allowed_hosts=allowed_hosts, workers=workers)
    os.execve(cmd[0], cmd, server_environment(os.environ))


def migrate_from_secrets(*, db_host: str, db_port: int, db_password_file: str | None) -> None:
    folder = Path(tempfile.mkdtemp(prefix="mlflow-migrate-"))
    pgpass = write_pgpass(folder / "pgpass", [(db_host, db_port, "mlflow",
                                               _read(db_password_file, "MLFLOW_DB_PASSWORD"))])
    try:
        migrate(f"postgresql+psycopg2://mlflow@{db_host}:{db_port}/mlflow", {"PGPASSFILE": str(pgpass)})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
