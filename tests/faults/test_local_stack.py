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
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from cushing.ops.stack import LocalStack, Postgres, StackError, free_port, port_open, stop_saved
from cushing.ops.stack.postgres import _pg_bin

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


def test_down_stops_the_stacks_process_group_and_leaves_anothers_alone(tmp_path):
    """stack.json keeps the server's process group id; after a reboot that number may be anyone's, and `down` may
    run as root. A group one of whose processes is the stack's (its auth config in the environment) is stopped;
    a group of unrelated processes is not."""
    d = tmp_path / "stack"
    d.mkdir()
    theirs = subprocess.Popen(["sleep", "300"], start_new_session=True)
    ours = subprocess.Popen(["sleep", "300"], start_new_session=True,
                            env={**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(d / "basic_auth.ini")})
    try:
        for proc in (theirs, ours):
            (d / "stack.json").write_text(json.dumps({
                "server_pgid": proc.pid, "pg_root": str(tmp_path / "no-cluster"), "url": "http://127.0.0.1:1",
                "port": free_port(), "pg_port": free_port(), "workers": 1}))
            assert stop_saved(d) == []
        time.sleep(0.5)
        assert theirs.poll() is None, "stack down stopped a process group that was not the stack's"
        assert ours.wait(10) == -signal.SIGTERM, "stack down left the stack's own process group running"
        down = _cushing("stack", "down", "--dir", str(d))
        assert down.returncode == 0 and not d.exists(), down.stderr
        assert theirs.poll() is None
    finally:
        for proc in (theirs, ours):
            proc.kill()
            proc.wait()


def test_a_failed_up_leaves_nothing_running_and_the_folder_takes_the_next_up(folder):
    """Up on a port something listens on fails at once, naming the port. Up whose MLflow server fails after
    PostgreSQL came up (the port is bound, though nobody listens yet, so that check passes) stops PostgreSQL and
    removes the cluster it made. Either way the next up in the folder works, and down leaves no PostgreSQL. A stack
    started again on an existing cluster uses the passwords its roles were made with, not the ones it was given."""
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        r = _cushing("stack", "up", "--dir", str(folder), "--port", str(port))
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert f"port {port}" in r.stderr and "in use" in r.stderr, r.stderr
        assert not (folder / "stack.json").exists()
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", port))
        failed = LocalStack(base=folder, port=port, workers=1)
        with pytest.raises(StackError, match=f"127.0.0.1:{port}"):
            failed.start()
    assert failed.pg.root is not None and not _postmasters(failed.pg.data), "PostgreSQL outlived the failed up"
    assert not failed.pg.root.exists(), "the cluster made for the failed up is left behind"
    assert not (folder / "stack.json").exists() and not (folder / "secrets.json").exists()

    up = _cushing("stack", "up", "--dir", str(folder), "--port", str(port))
    assert up.returncode == 0, up.stderr[-3000:]
    state, keys, _ = _state(folder)
    data = Path(state["pg_root"]) / "pgdata"
    assert _postmasters(data) and port_open(port)

    assert stop_saved(folder) == [] and not _postmasters(data)
    (folder / "stack.json").unlink()
    again = LocalStack(base=folder, port=port, workers=1, pg_root=Path(state["pg_root"]))  # new random passwords
    assert again.mlflow_db_password != keys["mlflow_db_password"]
    try:
        again.start()
    finally:
        if again.server is not None:
            again.save_state()
    assert (again.mlflow_db_password, again.admin_password) == (keys["mlflow_db_password"], keys["admin_password"])
    r = requests.get(f"{again.server.url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name":
                     "Default"}, auth=("admin", keys["admin_password"]), timeout=30)
    assert r.status_code == 200, r.text

    down = _cushing("stack", "down", "--dir", str(folder))
    assert down.returncode == 0, down.stderr
    assert not _postmasters(data), "stack down left PostgreSQL running"
    assert not port_open(port) and not folder.exists()
