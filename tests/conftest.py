"""Shared fixtures. Tests run on a CPU with no network; real faces are read from ../shared at test time."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub from tests
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")


def _shared_candidates() -> list[Path]:
    env = os.environ.get("CUSHING_SHARED")
    cands = [Path(env)] if env else []
    return cands + [ROOT.parent / "shared", Path("/work/shared")]


def shared_root() -> Path:
    for c in _shared_candidates():
        if (c / "data" / "celeba-chubby" / "manifest.csv").exists():
            return c
    pytest.fail("the shared data folder (../shared/data/celeba-chubby) was not found; set CUSHING_SHARED=/path/to/shared")


@pytest.fixture(scope="session")
def celeba_dir() -> Path:
    return shared_root() / "data" / "celeba-chubby"


@pytest.fixture(scope="session")
def celeba_manifest(celeba_dir) -> pd.DataFrame:
    df = pd.read_csv(celeba_dir / "manifest.csv")
    df["image"] = [str(celeba_dir / p) for p in df["image"]]
    return df


@pytest.fixture(scope="session")
def cushing_home(tmp_path_factory) -> Path:
    """One CUSHING_HOME (demo cohort, caches) for the session, so the demo cohort is drawn once."""
    home = tmp_path_factory.mktemp("cushing-home")
    os.environ["CUSHING_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def demo_manifest(cushing_home) -> Path:
    from cushing.train import resolve_data

    return resolve_data("demo")


@pytest.fixture()
def tracking(tmp_path, monkeypatch):
    """A fresh embedded MLflow store for one test; returns its URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory, demo_manifest) -> Path:
    """The demo cohort with its paper split, as a manifest in a tmp folder (absolute image paths)."""
    d = tmp_path_factory.mktemp("small-demo")
    df = pd.read_csv(demo_manifest)
    df["image"] = [str(demo_manifest.parent / p) for p in df["image"]]
    out = d / "manifest.csv"
    df.to_csv(out, index=False)
    return out


def copy_demo_images(demo_manifest: Path, dst: Path, n: int) -> list[Path]:
    """A few synthetic demo images copied into a test folder (never real faces)."""
    df = pd.read_csv(demo_manifest).head(n)
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for p in df["image"]:
        target = dst / Path(p).name
        shutil.copy(demo_manifest.parent / p, target)
        out.append(target)
    return out


@pytest.fixture(scope="session")
def pg_stack():
    """One real PostgreSQL + `mlflow server` (basic-auth) on loopback for the whole session."""
    from cushing.stack import LocalStack

    s = LocalStack(workers=1).start()  # one uvicorn worker starts (and restarts) fastest on a small CPU
    yield s
    s.stop()


@contextlib.contextmanager
def env_vars(values: dict):
    """Set environment variables (and MLflow's cached tracking URI) for a block; restore afterwards."""
    import mlflow

    saved = {k: os.environ.get(k) for k in [*values, "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"]}
    os.environ.update(values)
    for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        if k not in values:
            os.environ.pop(k, None)
    mlflow.set_tracking_uri(values.get("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri()))
    try:
        yield
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or None)


@pytest.fixture(scope="session")
def demo_sweep(tmp_path_factory, cushing_home):
    """`cushing sweep projects/demo.yaml --workers 2` once, on its own embedded store and SQLite Optuna storage."""
    import subprocess
    import sys

    d = tmp_path_factory.mktemp("demo-sweep")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("CUSHING_OPTUNA_STORAGE", None)
    r = subprocess.run([sys.executable, "-m", "cushing", "sweep", str(ROOT / "projects" / "demo.yaml"),
                        "--workers", "2"], cwd=d, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"uri": uri, "dir": d, "stdout": r.stdout, "storage": f"sqlite:///{d / 'optuna.db'}"}
