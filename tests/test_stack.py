"""The deploy files and the stack's own rules, without starting a stack: the compose file's properties, `docker
compose config` where Docker exists, default admin passwords refused, process groups stopped also when they ignore
SIGTERM; and the shared venv that `scripts/env.sh` builds once for every shell and clone. (The running stack is
tested in test_server.py and tests/faults/test_local_stack.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import yaml

from cushing.ops.stack import StackError, check_admin_password, stop_group
from tests.conftest import ROOT, running


def test_compose_file_properties():
    c = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    s = c["services"]
    assert {"postgres", "mlflow-migrate", "mlflow", "trainer", "serve"} <= set(s)
    assert "ports" not in s["postgres"], "the database is not published"
    assert "healthcheck" in s["postgres"] and "healthcheck" in s["mlflow"] and "healthcheck" in s["serve"]
    assert any("pgdata:" in v for v in s["postgres"]["volumes"])
    assert any("init-databases.sh:/docker-entrypoint-initdb.d/" in v for v in s["postgres"]["volumes"])
    assert s["mlflow"]["depends_on"]["mlflow-migrate"]["condition"] == "service_completed_successfully"
    assert "migrate" in s["mlflow-migrate"]["command"]
    cmd = " ".join(s["mlflow"]["command"])
    assert "--allowed-hosts" in cmd and "--admin-password-file" in cmd and "/mlartifacts" in cmd
    for name in ("mlflow", "serve"):
        for port in s[name]["ports"]:
            assert port.startswith("127.0.0.1:"), f"{name} is published on loopback only"
    assert "models:/cushing@champion" in " ".join(s["serve"]["command"])
    gpu = s["trainer"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert any(v.startswith("cushing-cache:") for v in s["trainer"]["volumes"]), "caches persist between runs"
    assert "cushing-cache" in c["volumes"]
    assert set(c["secrets"]) >= {"mlflow_admin_password", "mlflow_db_password", "optuna_db_password"}
    text = (ROOT / "docker-compose.yml").read_text()
    env_example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                       if line and not line.startswith("#"))
    for value in env_example.values():
        if "CHANGE-ME" in value:
            assert value not in text, "no secret value inline in the compose file"
    for name, svc in s.items():  # secrets reach services as files, never as inline environment values
        env = svc.get("environment") or {}
        env = dict(e.split("=", 1) for e in env) if isinstance(env, list) else env
        for key, value in env.items():
            if "PASSWORD" in key or "SECRET" in key:
                assert key.endswith("_FILE") and str(value).startswith("/run/secrets/"), (name, key)
    init = (ROOT / "cushing" / "ops" / "deploy" / "init-databases.sh").read_text()
    assert "CREATE DATABASE mlflow " in init and "CREATE DATABASE optuna " in init


def test_docker_compose_config_where_docker_exists(tmp_path):
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` here (this machine has no Docker engine or compose plugin)")
    env = tmp_path / ".env"
    env.write_text((ROOT / ".env.example").read_text())
    r = subprocess.run(["docker", "compose", "--env-file", str(env), "config", "-q"], cwd=ROOT, capture_output=True)
    assert r.returncode == 0, r.stderr


def test_default_admin_passwords_are_refused():
    for pw in ("", "password1234", "CHANGE-ME-admin-password", "short"):
        with pytest.raises(StackError):
            check_admin_password(pw)
    assert check_admin_password("a-long-real-secret-42") == "a-long-real-secret-42"


def test_stop_group_kills_a_group_that_ignores_sigterm_and_is_quiet_when_it_is_gone():
    # a shell and its child, both ignoring SIGTERM (an ignored signal stays ignored in children)
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300 & echo $!; wait"], start_new_session=True,
                            stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        t = time.time()
        assert stop_group(proc.pid, grace=1.0), "the group outlived SIGKILL"
        assert time.time() - t >= 1.0, "SIGTERM alone cannot have stopped a group that ignores it"
        assert not running(proc.pid) and not running(child)
        proc.wait(5)
        assert stop_group(proc.pid, grace=1.0), "a group that is gone already is not an error"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
