"""`cushing stack`: PostgreSQL + MLflow server without Docker (up, down, restart), and the commands the
docker-compose services run (mlflow-server, migrate)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cushing.cli.options import Command

COMMANDS: dict[str, Command] = {}


def _stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["up", "down", "restart", "mlflow-server", "migrate"],
                   help="up/down/restart: a throwaway PostgreSQL + mlflow server on 127.0.0.1 (no Docker); "
                        "mlflow-server/migrate: what the docker-compose services run")
    p.add_argument("--dir", default=".stack", help="up/down/restart: where the stack's state, logs, artifacts "
                                                   "and env.sh live")
    p.add_argument("--port", type=int, default=5000, help="MLflow server port")
    p.add_argument("--pg-port", type=int, default=0, help="PostgreSQL port (default: a free one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--db-host", default="postgres")
    p.add_argument("--db-port", type=int, default=5432)
    p.add_argument("--db-password-file", default=None)
    p.add_argument("--admin-password-file", default=None)
    p.add_argument("--secret-key-file", default=None)
    p.add_argument("--artifacts", default="/mlartifacts")
    p.add_argument("--allowed-hosts", default="127.0.0.1:5000,localhost:5000")
    p.add_argument("--workers", type=int, default=4)


def _stack(ns: argparse.Namespace) -> int:
    from cushing.ops import stack

    if ns.action == "mlflow-server":
        stack.exec_mlflow_server(db_host=ns.db_host, db_port=ns.db_port, db_password_file=ns.db_password_file,
                                 admin_password_file=ns.admin_password_file, secret_key_file=ns.secret_key_file,
                                 artifacts=ns.artifacts, host=ns.host, port=ns.port, allowed_hosts=ns.allowed_hosts,
                                 workers=ns.workers)
        return 0
    if ns.action == "migrate":
        stack.migrate_from_secrets(db_host=ns.db_host, db_port=ns.db_port, db_password_file=ns.db_password_file)
        print("mlflow db upgrade: done")
        return 0
    base = Path(ns.dir).resolve()
    saved = (base / "stack.json").exists()
    if ns.action in ("down", "restart") and not saved:
        print(f"no stack in {base} (no stack.json): nothing to {ns.action}", file=sys.stderr)
        return 1
    if ns.action == "down":
        port = json.loads((base / "stack.json").read_text())["port"]
        if problems := stack.stop_saved(base, remove=True):
            print("cushing stack down: could not stop everything, so nothing was removed: " + "; ".join(problems),
                  file=sys.stderr)
            return 1
        print(f"stopped the MLflow server on port {port} and PostgreSQL, removed {base}")
        return 0
    if ns.action == "restart":
        s = stack.restart_saved(base)
        print(f"restarted: PostgreSQL on 127.0.0.1:{s.pg.port}, MLflow server on {s.server.url}")
        return 0
    if saved:
        print(f"{base} already holds a stack; `cushing stack down --dir {ns.dir}` first", file=sys.stderr)
        return 1
    kw = {"admin_password": os.environ["MLFLOW_ADMIN_PASSWORD"]} if os.environ.get("MLFLOW_ADMIN_PASSWORD") else {}
    s = stack.LocalStack(base=base, pg_port=ns.pg_port, port=ns.port, **kw).start()
    env = s.save_state()
    where = "" if str(s.pg.root).startswith(str(base)) else f" (cluster in {s.pg.root}: the postgres user cannot " \
                                                               f"enter {base})"
    print(f"PostgreSQL on 127.0.0.1:{s.pg.port}{where}, MLflow server (basic-auth) on {s.server.url}\n"
          f"credentials and URIs: source {env}\nstop with: cushing stack down --dir {ns.dir}")
    return 0


COMMANDS["stack"] = ("PostgreSQL + MLflow server (basic-auth) without Docker; the compose services' commands",
                     _stack_args, _stack)
