"""The whole local stack, what `cushing stack up|down|restart` drive: PostgreSQL, the migrated schema and the
MLflow server, started all or nothing, its state (stack.json) and secrets (secrets.json, 0600) saved for `down`
and `restart`."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cushing.ops.stack.credentials import SECRET_KEYS, check_admin_password, write_pgpass
from cushing.ops.stack.postgres import Postgres
from cushing.ops.stack.processes import StackError, _group_is_ours, _listeners, _ours, free_port, port_open, \
    stop_group
from cushing.ops.stack.server import MlflowServer, migrate
from cushing.private import write_private

__all__ = ["LocalStack", "stop_saved", "restart_saved"]


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
        return self.storage_for("optuna")

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
        existed = ((self.pg.root or self.base / "pg") / "pgdata" / "PG_VERSION").exists()
        self._load_or_save_secrets(existed)
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
        self.stop(remove=False)
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
            _remove(self.base, self.pg.root)

    def save_state(self) -> Path:
        """What `cushing stack down|restart` need (processes and ports in stack.json, secrets.json) and what clients
        source (env.sh: URIs and credentials), all 0600. Returns env.sh."""
        assert self.server is not None and self.server.proc is not None
        self._save_secrets()
        self._save_state(server_pgid=self.server.proc.pid)
        return write_private(self.base / "env.sh", "".join(f"export {k}='{v}'\n" for k, v in self.env().items()))

    def _save_state(self, server_pgid: int | None) -> Path:
        return write_private(self.base / "stack.json", json.dumps({
            "server_pgid": server_pgid, "pg_root": str(self.pg.root), "url": f"http://127.0.0.1:{self.port}",
            "port": self.port, "pg_port": self.pg.port, "workers": self.workers}))

    def _save_secrets(self) -> Path:
        return write_private(self.base / "secrets.json", json.dumps({k: getattr(self, k) for k in SECRET_KEYS}))

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


def _remove(base: Path, pg_root: Path | str | None) -> None:
    """The stack's folder, and its cluster's when that lives elsewhere (/var/tmp)."""
    shutil.rmtree(base, ignore_errors=True)
    if pg_root and not str(pg_root).startswith(str(base)):
        shutil.rmtree(pg_root, ignore_errors=True)


def stop_saved(base: Path, remove: bool = False) -> list[str]:
    """Stop everything a `cushing stack up` in `base` started: the server's process group, any process still
    listening on its port (a server restarted since), PostgreSQL. Returns what could not be stopped; with `remove`,
    when that is nothing, the stack's folder and cluster are removed."""
    state = json.loads((base / "stack.json").read_text())
    problems = []
    pgid = int(state.get("server_pgid") or state.get("server_pid") or 0)
    if _group_is_ours(pgid, base):
        stop_group(pgid)
    for pid in _listeners(int(state["port"])):
        with contextlib.suppress(OSError):
            if _ours(pid, base):
                stop_group(os.getpgid(pid))
    if port_open(int(state["port"])):
        problems.append(f"something still listens on 127.0.0.1:{state['port']}")
    pg = Postgres(base, int(state["pg_port"]), root=Path(state["pg_root"]))
    pg.stop()
    if pg.data.exists() and pg.running():
        problems.append(f"PostgreSQL in {pg.data} is still running")
    if remove and not problems:
        _remove(base, state["pg_root"])
    return problems


def restart_saved(base: Path) -> LocalStack:
    """Stop and start the stack of `base` again with the same data, ports and passwords."""
    if problems := stop_saved(base):
        raise StackError("could not stop the running stack: " + "; ".join(problems))
    s = LocalStack.from_saved(base)
    s.start()
    s.save_state()
    return s
