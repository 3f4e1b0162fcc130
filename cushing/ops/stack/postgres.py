"""A throwaway PostgreSQL cluster on 127.0.0.1, a password asked of every connection (scram-sha-256, also on its
Unix socket, in a folder only the postgres user can enter). PostgreSQL refuses to run as root: when root, its
commands run as the `postgres` user (runuser), and when that user cannot reach the stack's folder (under root's
home, mode 0700) the cluster lives in a private folder of its own under /var/tmp instead."""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cushing.ops.stack.processes import StackError, free_port
from cushing.private import write_private

__all__ = ["Postgres", "INIT_SCRIPT"]

INIT_SCRIPT = Path(__file__).parents[1] / "deploy" / "init-databases.sh"


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if found[-1]:
        return found[-1]
    raise StackError(f"PostgreSQL's {name} was not found: install Debian's postgresql (apt-get install postgresql)")


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    return [runuser, "-u", "postgres", "--", *cmd] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c",
                                                                   " ".join(cmd)]


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
    def data(self) -> Path:
        return self.root / "pgdata"

    def _place(self) -> None:
        """base/pg when the postgres user can reach base (base is made traversable, not listable, for it);
        otherwise a private folder of its own under /var/tmp (root's home is 0700)."""
        if self.root is not None:
            return
        if os.geteuid() == 0:
            os.chmod(self.base, 0o711)
        if os.geteuid() != 0 or subprocess.run(_as_postgres(["test", "-x", str(self.base)]),
                                               capture_output=True).returncode == 0:
            self.root = self.base / "pg"
            self.root.mkdir(exist_ok=True)
        else:
            self.root = Path(tempfile.mkdtemp(prefix="cushing-pg-", dir="/var/tmp"))
        self._own(self.root)
        os.chmod(self.root, 0o700)

    def _own(self, *paths: Path) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for p in paths:
                os.chown(p, pw.pw_uid, pw.pw_gid)

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), *args]), capture_output=True,
                              text=True)

    def start(self) -> "Postgres":
        self.base.mkdir(parents=True, exist_ok=True)
        self._place()
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        log = self.root / "postgres.log"
        log.touch()
        self._own(log)
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root / 'sock'} -c unix_socket_permissions=0700"
        r = self._pg_ctl("-l", str(log), "-o", opts, "-w", "-t", "60", "start")
        if r.returncode != 0:
            raise StackError(f"PostgreSQL did not start: {r.stderr}\n{log.read_text()[-2000:]}")
        return self

    def _initdb(self) -> None:
        pwfile, dirs = self.root / "pwfile", (self.data, self.root / "sock")
        for d in dirs:
            d.mkdir(exist_ok=True)
            os.chmod(d, 0o700)
        write_private(pwfile, self.superuser_password)
        self._own(*dirs, pwfile)
        r = subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
                                         "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                                         f"--pwfile={pwfile}"]), capture_output=True, text=True)
        pwfile.unlink(missing_ok=True)
        if r.returncode != 0:
            raise StackError(f"initdb failed in {self.data}: {r.stderr.strip()[-1500:]}")

    def init_databases(self, mlflow_password: str, optuna_password: str) -> None:
        """The roles and databases (init-databases.sh); passwords reach psql through its environment."""
        env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": "postgres",
               "PGPASSWORD": self.superuser_password, "MLFLOW_DB_PASSWORD": mlflow_password,
               "OPTUNA_DB_PASSWORD": optuna_password}
        r = subprocess.run(["sh", str(INIT_SCRIPT)], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise StackError(f"creating databases failed: {r.stderr}")

    def uri(self, db: str, user: str, driver: str = "postgresql+psycopg2") -> str:
        """Without the password: libpq finds it in PGPASSFILE, so no command line ever carries it."""
        return f"{driver}://{user}@127.0.0.1:{self.port}/{db}"

    def running(self) -> bool:
        return self._pg_ctl("status").returncode == 0

    def stop(self) -> None:
        if self.data.exists():
            self._pg_ctl("-m", "fast", "-w", "stop")
