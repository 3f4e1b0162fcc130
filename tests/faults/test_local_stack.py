"""The local stack on a host with other accounts: nobody else reaches PostgreSQL or the artifacts, no password is
visible in `ps` (not even for the instant psql creates the roles), and `cushing stack up|restart|down` do what they
say, also under root's home (mode 0700): `down` stops only what is the stack's, and an `up` that fails leaves
nothing running and the folder ready for the next `up`."""
from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from cushing.ops.stack import LocalStack, Postgres, _pg_bin, port_open

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.postgres]

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="other-account checks run as root (runuser -u nobody)")


def _cushing(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cushing", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _new_folder() -> Path:
    """A stack folder under root's home when root (the postgres user cannot enter it)."""
    parent = Path.home() / ".cache" if os.geteuid() == 0 else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="stack-test-", dir=parent))


@pytest.fixture
def folder():
    d = _new_folder()
    yield d
    if (d / "stack.json").exists():
        _cushing("stack", "down", "--dir", str(d))
    shutil.rmtree(d, ignore_errors=True)


def _postmasters(data: Path) -> list[int]:
    """Pids of PostgreSQL servers running on the cluster in `data` (the postmaster's command line names it)."""
    pids = []
    for f in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            args = Path(f).read_bytes().split(b"\0")
        except OSError:
            continue
        if args[0].endswith(b"/postgres") and str(data).encode() in args:
            pids.append(int(f.split("/")[2]))
    return pids


@pytest.fixture(scope="module")
def stack_dir():
    """`cushing stack up --dir` in a folder under root's home when root (the postgres user cannot enter it)."""
    d = _new_folder()
    r = _cushing("stack", "up", "--dir", str(d), "--port", "0")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr[-3000:]
    yield d, r.stdout
    if (d / "stack.json").exists():
        _cushing("stack", "down", "--dir", str(d))
    shutil.rmtree(d, ignore_errors=True)


def _state(d: Path) -> tuple[dict, dict, dict]:
    env = dict(line[len("export "):].split("=", 1) for line in (d / "env.sh").read_text().splitlines())
    env = {k: v.strip("'") for k, v in env.items()}
    return json.loads((d / "stack.json").read_text()), json.loads((d / "secrets.json").read_text()), env


def _nobody(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "nobody", "--", *cmd], capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ["PATH"], "HOME": "/"})


@as_root
def test_other_accounts_cannot_reach_the_database_or_the_artifacts(stack_dir):
    d, out = stack_dir
    state, keys, _ = _state(d)
    assert "the postgres user cannot enter" in out, "the cluster moved out of root's home"
    sock = Path(state["pg_root"]) / "sock"
    psql = shutil.which("psql") or sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))[-1]
    for host in (str(sock), "127.0.0.1"):
        r = _nobody(str(psql), "-w", "-h", host, "-p", str(state["pg_port"]), "-U", "postgres", "-d", "mlflow_auth",
                    "-c", "select count(*) from users")
        assert r.returncode != 0, f"nobody connected through {host}: {r.stdout}"
    assert _nobody("ls", str(d / "mlartifacts")).returncode != 0
    for f in ("env.sh", "secrets.json", "pgpass", "stack.json", "basic_auth.ini"):
        assert (d / f).stat().st_mode & 0o077 == 0, f
    assert (d / "mlartifacts").stat().st_mode & 0o077 == 0


def test_no_password_on_any_command_line(stack_dir):
    d, _ = stack_dir
    _, keys, _ = _state(d)
    args = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    assert "mlflow server" in args or "mlflow.server" in args or "uvicorn" in args
    for name, secret in keys.items():
        assert secret not in args, f"the {name} is visible in ps"


def test_restart_keeps_data_and_down_stops_what_listens(stack_dir):
    d, _ = stack_dir
    state, keys, env = _state(d)
    auth = ("admin", keys["admin_password"])
    api = f"{state['url']}/api/2.0/mlflow/experiments"
    assert requests.post(f"{api}/create", json={"name": "kept"}, auth=auth, timeout=30).status_code == 200
    r = _cushing("stack", "restart", "--dir", str(d))
    assert r.returncode == 0, r.stderr[-2000:]
    got = requests.get(f"{api}/get-by-name", params={"experiment_name": "kept"}, auth=auth, timeout=30)
    assert got.status_code == 200, "the data and the admin password survive a restart"
    # the server is restarted behind the stack's back (a new process group that stack.json does not name)
    new_state = json.loads((d / "stack.json").read_text())
    os.killpg(new_state["server_pgid"], signal.SIGTERM)
    deadline = time.time() + 30
    while port_open(new_state["port"]) and time.time() < deadline:
        time.sleep(0.3)
    rogue = LocalStack.from_saved(d)
    rogue._server().start()
    assert port_open(new_state["port"])
    down = _cushing("stack", "down", "--dir", str(d))
    assert down.returncode == 0, down.stderr
    assert not port_open(new_state["port"]), "the restarted server was stopped too"
    assert not d.exists() and not Path(state["pg_root"]).exists()


def test_database_passwords_reach_psql_through_its_environment_not_its_arguments(folder, tmp_path, monkeypatch):
    """`stack up` creates the roles with init-databases.sh, which runs psql; psql lives for an instant, but `ps`
    shows every process's arguments to every account. A psql first on PATH records its arguments, then runs the
    real one: the roles work with their passwords, and the arguments never held them."""
    real = _pg_bin("psql")
    record = tmp_path / "psql-arguments"
    shim = tmp_path / "bin" / "psql"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> "{record}"\nexec "{real}" "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}:{os.environ['PATH']}")
    pg = Postgres(folder).start()
    try:
        mlflow_pw, optuna_pw = f"mlflow-{secrets.token_hex(12)}", f"optuna-{secrets.token_hex(12)}"
        pg.init_databases(mlflow_pw, optuna_pw)
        arguments = record.read_text()
        assert "--username" in arguments, "init-databases.sh ran the psql on PATH"
        assert mlflow_pw not in arguments and optuna_pw not in arguments, "a password was on psql's command line"
        for user, password, works in (("mlflow", mlflow_pw, True), ("optuna", optuna_pw, True),
                                      ("mlflow", optuna_pw, False)):
            r = subprocess.run([real, "-w", "-h", "127.0.0.1", "-p", str(pg.port), "-U", user, "-d", user, "-tAc",
                                "select current_user"], env={**os.environ, "PGPASSWORD": password},
                               capture_output=True, text=True, timeout=30)
            assert (r.returncode == 0 and r.stdout.strip() == user) == works, (user, works, r.stderr)
    finally:
        pg.stop()
        shutil.rmtree(pg.root, ignore_errors=True)

