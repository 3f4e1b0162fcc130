"""Secrets never reach a command line, an #SBATCH line or the pickled task. The tasks read the Optuna storage URL
from CUSHING_OPTUNA_STORAGE and MLflow's credentials from the environment sbatch exports (its default --export=ALL;
slurmctld keeps a copy in its state folder, `scontrol show job` does not show it), or from 0600 files on shared
storage: PGPASSFILE for PostgreSQL, and CUSHING_SECRETS_FILE (KEY=VALUE lines), whose variables are then left out
of the job's environment altogether and read by each task."""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

from cushing.tracking import tracking_uri
from cushing.workflows.cluster.options import ClusterError

__all__ = ["STORAGE_ENV", "SECRETS_FILE_ENV", "SECRET_VARIABLES", "read_secrets_file"]


STORAGE_ENV = "CUSHING_OPTUNA_STORAGE"
SECRETS_FILE_ENV = "CUSHING_SECRETS_FILE"
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
                    "PGPASSWORD", "DATABRICKS_TOKEN", "AWS_SECRET_ACCESS_KEY")


def _mode_problem(var: str, path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return f"{var}={path}: no such file (it must exist on every node, e.g. on shared storage)"
    mode = p.stat().st_mode & 0o777
    if mode & 0o077:
        return f"{var}={path} has mode {mode:o}: other accounts can read it; chmod 600 {path}"
    return None


def read_secrets_file(path: str | os.PathLike) -> dict[str, str]:
    """KEY=VALUE lines (`export ` and quotes allowed, # comments) from a file only its owner can read."""
    if problem := _mode_problem(SECRETS_FILE_ENV, str(path)):
        raise ClusterError(problem)
    out = {}
    for line in (raw.strip() for raw in Path(path).read_text().splitlines()):
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise ClusterError(f"{path}: expected KEY=VALUE lines, got {line.split('=')[0]!r}...")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


@contextlib.contextmanager
def _job_environment(storage: str) -> Iterator[None]:
    """What sbatch exports to the tasks (submitit runs it with this process's environment): the storage URL and the
    tracking URI set, `mlflow run`'s run and the secrets file's variables left out, this checkout importable."""
    saved, env = dict(os.environ), os.environ
    env[STORAGE_ENV] = storage
    env["MLFLOW_TRACKING_URI"] = tracking_uri()
    env.pop("MLFLOW_RUN_ID", None)  # tasks log children of the parent, not into an `mlflow run` run
    if env.get(SECRETS_FILE_ENV):
        secret = read_secrets_file(env[SECRETS_FILE_ENV])
        if secret.get(STORAGE_ENV, storage) != storage:
            raise ClusterError(f"{SECRETS_FILE_ENV} sets {STORAGE_ENV} to another storage than this launch's: the "
                               "tasks would train another study")
        for key in secret:
            env.pop(key, None)
    root = Path(__file__).resolve().parents[3]  # the checkout holding cushing/
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if (root / "pyproject.toml").exists() and str(root) not in paths:  # a source checkout, not an installed package
        env["PYTHONPATH"] = os.pathsep.join([str(root), *paths])
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
