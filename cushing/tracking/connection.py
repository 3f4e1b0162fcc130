"""Where runs go: the tracking URI (MLFLOW_TRACKING_URI, else the embedded SQLite store in the working directory),
a fast check that a tracking server answers, MLflow pointed at the store (its schema made once per process, under
the store's lock), the client, and a block on another store. mlflow is imported inside the functions."""
from __future__ import annotations

import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cushing.interrupts import guard_connections, held
from cushing.tracking.stores import seed_sqlite, sqlite_path, store_lock

__all__ = ["HTTP_RETRY_DEFAULTS", "tracking_uri", "TrackingUnavailable", "check_reachable", "configure", "client",
           "artifact_dir", "using_store"]


# Client-side retries so a brief server restart does not kill a run (MLflow's own variables).
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "120",
}


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


_READY: set[str] = set()  # stores this process has opened (a SQLite store is created or migrated on first use)


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached; the message names the URI and what to do."""


def check_reachable(timeout: float | None = None) -> None:
    """Fail fast, naming the URI, when an http(s) tracking server does not answer: MLflow's own client retries
    (set for surviving a server restart mid-run) would otherwise spend minutes in silence before a traceback.
    Runs once per URI and process, before any data is decoded."""
    uri = tracking_uri()
    if uri in _READY or not uri.startswith(("http://", "https://")):
        return
    from urllib.parse import urlparse

    timeout = float(os.environ.get("CUSHING_TRACKING_CONNECT_S", "20")) if timeout is None else timeout
    u = urlparse(uri)
    port = u.port or (443 if u.scheme == "https" else 80)
    deadline, last = time.time() + timeout, ""
    while True:
        try:
            socket.create_connection((u.hostname, port), timeout=min(5.0, timeout)).close()
            _READY.add(uri)
            return
        except OSError as e:
            last = e.strerror or str(e)
        if time.time() >= deadline:
            raise TrackingUnavailable(
                f"the MLflow tracking server at {uri} is not reachable ({last}; tried for {timeout:.0f} s). Start "
                "it (`cushing stack up`, `docker compose up -d`), fix MLFLOW_TRACKING_URI, or unset it to use the "
                "embedded store in this folder.")
        time.sleep(1.0)


def configure() -> str:
    """Point MLflow at the resolved tracking URI and set retry defaults; returns the URI.

    The first use of an embedded SQLite store creates or migrates its schema; two launchers starting at once on a
    fresh store would race in that migration (`duplicate column name`), so it runs under a file lock."""
    import mlflow

    for k, v in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri()
    check_reachable()
    if _database_store(uri):
        guard_connections()
    mlflow.set_tracking_uri(uri)
    _ensure_store(uri)
    return uri


def _database_store(uri: str) -> bool:
    """MLflow opens `uri` as a SQLAlchemy store (its scheme, less any `+driver`, is one of MLflow's engines)."""
    from mlflow.store.db.db_types import DATABASE_ENGINES

    return uri.partition(":")[0].partition("+")[0] in DATABASE_ENGINES


def _ensure_store(uri: str) -> None:
    """Create or migrate an embedded SQLite store once per process, under the store's lock."""
    import mlflow

    if uri not in _READY and sqlite_path(uri) is not None:
        with store_lock(uri, "mlflow-schema"):
            seed_sqlite(uri)  # a new store gets its schema from a template, not ~60 migrations again
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
        _READY.add(uri)


def client():
    """An MlflowClient; on an embedded SQLite store, its calls from the main thread hold back a Ctrl-C or SIGTERM
    until they return (`cushing.interrupts`), so a stop never leaves the store's file locked mid-write."""
    import mlflow

    uri = configure()
    c = mlflow.MlflowClient()
    return _HeldClient(c) if sqlite_path(uri) is not None else c


def holding():
    """`interrupts.held()` where the store is an embedded SQLite file (a server's writes may retry for minutes: a
    stop is not held back that long)."""
    return held(sqlite_path(tracking_uri()) is not None)


class _HeldClient:
    """An MlflowClient whose method calls run inside `interrupts.held()` (a no-op off the main thread)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with held():
                return attr(*args, **kwargs)
        return call


@contextmanager
def artifact_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cushing-art-") as d:
        yield Path(d)


@contextmanager
def using_store(uri: str) -> Iterator[str]:
    """Point this process at another tracking store for a block (e.g. a benchmark's throwaway one); restore after.
    The block runs in an absolute SQLite store's folder: MLflow puts such a store's artifacts in ./mlruns, which is
    then beside the store instead of in the caller's working directory."""
    import mlflow

    saved, cwd, store = os.environ.get("MLFLOW_TRACKING_URI"), os.getcwd(), sqlite_path(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(store.parent if store is not None and store.is_absolute() else cwd)
    try:
        yield configure()
    finally:
        os.chdir(cwd)
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
        mlflow.set_tracking_uri(tracking_uri())  # point back only: opening the store is for whoever uses it
