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

from cushing import stops
from cushing.tracking.stores import seed_sqlite, sqlite_path, store_lock

__all__ = ["HTTP_RETRY_DEFAULTS", "http_defaults", "tracking_uri", "TrackingUnavailable", "check_reachable",
           "configure", "client", "artifact_dir", "using_store"]


# Client-side retries so a brief server restart does not kill a run (MLflow's own variables).
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "120"}


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", "").strip() or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def http_defaults(startup: bool = False) -> None:
    """What MLflow reads from the environment, set before any other thread runs: the client's retries
    (HTTP_RETRY_DEFAULTS) where not set; at the CLI's start-up also the tracking URI resolved (MLflow's own
    `set_tracking_uri` writes the environment: with it set already, `configure` never calls it)."""
    uri = {"MLFLOW_TRACKING_URI": tracking_uri()} if startup else {}
    for k, v in {**HTTP_RETRY_DEFAULTS, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **uri}.items():
        os.environ.setdefault(k, v)


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
        stops.check()
        if time.time() >= deadline:
            raise TrackingUnavailable(
                f"the MLflow tracking server at {uri} is not reachable ({last}; tried for {timeout:.0f} s). Start "
                "it (`cushing stack up`, `docker compose up -d`), fix MLFLOW_TRACKING_URI, or unset it to use the "
                "embedded store in this folder.")
        stops.wait(1.0)


def configure() -> str:
    """Point MLflow at the resolved tracking URI; returns the URI.

    The first use of an embedded SQLite store creates or migrates its schema, once per process; two launchers
    starting at once on a fresh store would race in that migration (`duplicate column name`): it runs under a lock."""
    import mlflow

    http_defaults()  # a no-op after the CLI's start-up; library use gets the same settings on first use
    uri = tracking_uri()
    check_reachable()
    if mlflow.get_tracking_uri() != uri:  # MLflow writes the environment here: not after start-up (`http_defaults`)
        mlflow.set_tracking_uri(uri)
    if uri not in _READY and sqlite_path(uri) is not None:
        with store_lock(uri, "mlflow-schema"):
            seed_sqlite(uri)  # a new store gets its schema from a template, not ~60 migrations again
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
        _READY.add(uri)
    return uri


def client():
    import mlflow

    return mlflow.MlflowClient(configure())


@contextmanager
def artifact_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cushing-art-") as d:
        yield Path(d)


@contextmanager
def using_store(uri: str) -> Iterator[str]:
    """Point this process at another tracking store for a block (a benchmark's throwaway one, between its runs);
    restore after. The block runs in an absolute SQLite store's folder: MLflow puts such a store's artifacts in
    ./mlruns, which is then beside the store instead of in the caller's working directory."""
    import mlflow

    saved, cwd, store = os.environ.get("MLFLOW_TRACKING_URI"), os.getcwd(), sqlite_path(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(store.parent if store is not None and store.is_absolute() else cwd)
    try:
        yield configure()
    finally:
        os.chdir(cwd)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.update({} if saved is None else {"MLFLOW_TRACKING_URI": saved})
        mlflow.set_tracking_uri(saved or tracking_uri())  # point back only: opening it is for whoever uses it
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)  # MLflow's set_tracking_uri writes it
