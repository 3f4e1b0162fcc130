"""The one place that logs runs to MLflow (the release package handles registry and serving).

Tracking URI: MLFLOW_TRACKING_URI when set, else the embedded default: `sqlite:///mlflow.db` with artifacts in
`./mlruns`, both in the working directory (MLflow's own default, made explicit).
"""
from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd

__all__ = ["tracking_uri", "configure", "RunLogger", "start_run", "artifact_dir", "client", "HTTP_RETRY_DEFAULTS",
           "find_runs", "download_artifact", "get_run", "resume_run", "experiment_id", "using_store"]

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


def configure() -> str:
    """Point MLflow at the resolved tracking URI and set retry defaults; returns the URI."""
    import mlflow

    for k, v in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def client():
    import mlflow

    configure()
    return mlflow.MlflowClient()


@contextmanager
def artifact_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cushing-art-") as d:
        yield Path(d)


def _clean(metrics: Mapping[str, float]) -> dict[str, float]:
    """MLflow forbids '=' in names; NaN is allowed and means 'not estimable'."""
    out = {}
    for k, v in metrics.items():
        if v is None:
            continue
        if "=" in k:
            raise ValueError(f"metric name {k!r} contains '=', which MLflow forbids")
        out[k] = float(v)
    return out


class _EpochWriter:
    """A background thread that writes per-epoch metrics with `log_batch`, several epochs per call when it falls
    behind. The training loop only enqueues. Unlike MLflow's async queue, which polls with a one-second timeout,
    flush and close return as soon as the queue is written (MLflow's cost up to a second each, three per run)."""

    _CLOSE = None

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.q: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.client = None

    def put(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name=f"epoch-metrics-{self.run_id[:8]}", daemon=True)
            self.thread.start()
        self._raise()
        self.q.put((int(time.time() * 1000), epoch, dict(metrics)))

    def flush(self) -> None:
        self.q.join()  # every item taken is marked done, written or not (errors are kept for _raise)
        self._raise()

    def close(self) -> None:
        if self.thread is not None:
            self.q.put(self._CLOSE)
            self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise RuntimeError(f"logging per-epoch metrics to MLflow failed: {err!r}") from err

    def _loop(self) -> None:
        while True:
            items = [self.q.get()]
            while True:
                try:
                    items.append(self.q.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write([it for it in items if it is not self._CLOSE])
            except Exception as e:  # surfaced on the next put/flush/close, in the training thread
                self.error = e
            for _ in items:
                self.q.task_done()
            if self._CLOSE in items:
                return

    def _write(self, epochs: list[tuple]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, ts, step) for ts, step, m in epochs for k, v in m.items()]
        self.client = self.client or client()
        for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000], synchronous=True)


class RunLogger:
    """Everything a training run logs, one method per kind of thing."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._epochs = _EpochWriter(run_id)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Queued for a background `log_batch` (one call per epoch, or fewer): the training loop never waits on the
        tracking server."""
        self._epochs.put(epoch, _clean(metrics))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        clean = _clean(metrics)
        items = list(clean.items())
        for i in range(0, len(items), 900):  # log_batch takes at most 1000 metrics per call
            mlflow.log_metrics(dict(items[i:i + 900]), step=step)

    def log_dict(self, data: Any, name: str) -> None:
        import mlflow

        mlflow.log_dict(data, name)

    def log_table(self, df: pd.DataFrame, name: str) -> None:
        import mlflow

        with artifact_dir() as d:
            path = d / Path(name).name
            df.to_csv(path, index=False)
            mlflow.log_artifact(str(path), str(Path(name).parent) if Path(name).parent != Path(".") else None)

    def log_files(self, folder: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifacts(str(folder), artifact_path)

    def log_dataset(self, table: pd.DataFrame, *, digest: str, name: str, context: str = "training") -> None:
        """The cohort as a run input: hashed subjects, split, sex and label only (no paths, no file names)."""
        import mlflow

        from mlflow.data.code_dataset_source import CodeDatasetSource

        source = CodeDatasetSource({"cohort_digest": digest, "note": "file paths withheld (faces are PHI)"})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*integer column.*")
            ds = mlflow.data.from_pandas(table, source=source, name=name, digest=digest[:36], targets="label")
        mlflow.log_input(ds, context=context)

    def flush(self) -> None:
        """Wait until every queued epoch is written (raises if writing failed)."""
        self._epochs.flush()

    def close(self) -> None:
        self._epochs.close()


def experiment_id(name: str) -> str:
    """The id of an experiment, created (with the server's default artifact location) when missing.

    Unlike mlflow.set_experiment this leaves no process-wide state behind (it would export MLFLOW_EXPERIMENT_ID
    to every subprocess, which then clashes with `mlflow run --experiment-name`).
    """
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # another worker created it first
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _active_env_run() -> str | None:
    return os.environ.get("MLFLOW_RUN_ID") or None


@contextmanager
def start_run(*, experiment: str, run_name: str, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None, use_env_run: bool = True) -> Iterator[RunLogger]:
    """A run in `experiment`: the one `mlflow run` created (MLFLOW_RUN_ID) or a new (child) run.

    The run ends FAILED when the body raises, KILLED on Ctrl-C, else FINISHED.
    """
    import mlflow

    configure()
    env_run = _active_env_run() if use_env_run and parent_run_id is None else None
    if env_run:
        run = mlflow.start_run(run_id=env_run)
        mlflow.set_tag("mlflow.runName", run_name)
        actual = client().get_experiment(run.info.experiment_id).name
        if actual != experiment:
            import sys

            print(f"note: this run is in experiment {actual!r} (chosen by `mlflow run --experiment-name` or "
                  f"MLFLOW_EXPERIMENT_NAME), not {experiment!r}; promotion and reports look in the experiment you "
                  f"name, so pass --experiment-name {experiment}", file=sys.stderr)
    else:
        run = mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name,
                               nested=parent_run_id is not None or mlflow.active_run() is not None,
                               parent_run_id=parent_run_id)
    logger = RunLogger(run.info.run_id)
    if tags:
        logger.set_tags(tags)
    status = "FINISHED"
    try:
        yield logger
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        try:
            logger.close()
        except Exception:
            if status == "FINISHED":
                status = "FAILED"
                raise
            # the body's own exception is already propagating; do not mask it
        finally:
            mlflow.end_run(status=status)


@contextmanager
def using_store(uri: str) -> Iterator[str]:
    """Point this process at another tracking store for a block (e.g. a benchmark's throwaway one); restore after."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield configure()
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
        configure()


@contextmanager
def resume_run(run_id: str) -> Iterator[RunLogger]:
    """Log more into an existing run (e.g. CAMs computed later); its status is left FINISHED."""
    import mlflow

    configure()
    mlflow.start_run(run_id=run_id)
    logger = RunLogger(run_id)
    try:
        yield logger
    finally:
        try:
            logger.close()
        finally:
            mlflow.end_run()


def get_run(run_id: str):
    return client().get_run(run_id)


def find_runs(experiment: str, *, filter_string: str = "", parent_run_id: str | None = None,
              max_results: int = 5000) -> list:
    """Runs of an experiment (optionally the children of one parent), newest first."""
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    f = filter_string
    if parent_run_id:
        clause = f"tags.mlflow.parentRunId = '{parent_run_id}'"
        f = f"{f} and {clause}" if f else clause
    return list(c.search_runs([exp.experiment_id], filter_string=f, max_results=max_results,
                              order_by=["attributes.start_time DESC"]))


def download_artifact(run_id: str, path: str, dst: str | Path) -> Path:
    import mlflow

    configure()
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))

