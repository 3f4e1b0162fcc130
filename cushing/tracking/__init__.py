"""The one place that logs runs to MLflow (the release package handles registry and serving).

Tracking URI: MLFLOW_TRACKING_URI when set, else the embedded default: `sqlite:///mlflow.db` with artifacts in
`./mlruns`, both in the working directory (MLflow's own default, made explicit).

Metric names: one name, one meaning. Per-epoch series live under `epoch/` with step = epoch (`epoch/val/f1`,
`epoch/train/loss`, ...): the MLflow UI draws them as curves in their own chart section. Final results (best
epoch, operating threshold chosen on validation) keep the contract names (`val/f1`, `test/f1/female`,
`test/f1/ci_low`, ...) and are logged once at step 0, so the UI shows them as single values (bar charts) that the
compare view lines up across runs.

Runs started by `mlflow run` (MLFLOW_RUN_ID set) are used as they are: every entry point logs into the run
`mlflow run` created (MLflow's multistep-workflow convention) instead of opening a second one.

Owns: runs (start, resume, log, heartbeats, reaping dead runs), the typed records other packages read runs as
(`RunRecord`), the stores (`stores`: SQLite paths, first-use locks). Imports mlflow, nothing of the package but
`cushing.config`; with `cushing.release`, the only place that touches an MLflow object.
"""
from __future__ import annotations

import math
import os
import queue
import socket
import tempfile
import threading
import time
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd

from cushing.tracking.stores import sqlite_path, store_lock

__all__ = ["tracking_uri", "configure", "RunLogger", "start_run", "artifact_dir", "HTTP_RETRY_DEFAULTS",
           "find_runs", "download_artifact", "get_run", "resume_run", "experiment_id", "using_store", "EPOCH_PREFIX",
           "env_run_id", "experiments_with_runs", "experiment_of_run", "reap", "check_reachable",
           "TrackingUnavailable", "last_step", "log_artifacts_to", "RunRecord", "set_tags", "end_run_as",
           "list_artifacts", "log_into"]

EPOCH_PREFIX = "epoch/"  # per-epoch series: epoch/val/f1 at step = epoch; final results keep the bare names

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
    mlflow.set_tracking_uri(uri)
    _ensure_store(uri)
    return uri


def _ensure_store(uri: str) -> None:
    """Create or migrate an embedded SQLite store once per process, under the store's lock."""
    import mlflow

    if uri not in _READY and sqlite_path(uri) is not None:
        with store_lock(uri, "mlflow-schema"):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
        _READY.add(uri)


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


def _process_id(pid: int) -> str:
    """pid:start-time, so that a recycled pid is not taken for the process that died."""
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{pid}:{start}"


def machine_id() -> str:
    """Which kernel and pid namespace a pid means something in: containers that share a hostname (or a host's
    network) each have their own pids, so a pid is checked only where boot id and pid namespace both match. Across
    machines the heartbeat decides (clocks more than CUSHING_RUN_STALE_S apart would need NTP)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return "unknown"
    return f"{boot}:{ns}"


def _alive(process: str) -> bool:
    pid = int(process.split(":")[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _process_id(pid) == process or process.endswith(":?")


class _Heartbeat:
    """A daemon thread that tags its run `cushing.heartbeat` (unix seconds) every CUSHING_RUN_HEARTBEAT_S."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.interval = float(os.environ.get("CUSHING_RUN_HEARTBEAT_S", "30"))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"run-heartbeat-{run_id[:8]}", daemon=True)

    def start(self) -> None:
        client().set_tag(self.run_id, "cushing.process", f"{socket.gethostname()}/{_process_id(os.getpid())}")
        client().set_tag(self.run_id, "cushing.machine", machine_id())
        self._beat()
        self.thread.start()

    def _beat(self) -> None:
        client().set_tag(self.run_id, "cushing.heartbeat", str(int(time.time())))

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self._beat()
            except Exception:  # a brief server outage; the next beat tries again
                pass

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(5)


def _dead_because(run: "RunRecord", now: float) -> str | None:
    """Why a RUNNING run's process is gone, or None while it may still live."""
    tags = run.tags
    beat = tags.get("cushing.heartbeat")
    if run.status != "RUNNING" or beat is None:
        return None
    host, _, process = tags.get("cushing.process", "/").partition("/")
    here = host == socket.gethostname() and tags.get("cushing.machine") == machine_id()
    if here and process and not _alive(process):
        return f"its process ({process.split(':')[0]} on {host}) is gone"
    stale = float(os.environ.get("CUSHING_RUN_STALE_S", "180"))
    if now - float(beat) > stale:
        return f"no heartbeat for {now - float(beat):.0f} s (more than {stale:.0f} s)"
    return None


def reap(runs: list["RunRecord"]) -> int:
    """Mark FAILED, with a `cushing.died` tag saying why, every RUNNING run whose process died (SIGKILL, OOM, a
    lost node): the run's own host and pid are gone, or its heartbeat is older than CUSHING_RUN_STALE_S. Returns
    how many were marked."""
    now, n = time.time(), 0
    for r in runs:
        why = _dead_because(r, now)
        if why:
            end_run_as(r.run_id, "FAILED", {"cushing.died": why})
            n += 1
    return n


def _param_text(value: Any) -> str:
    return "" if value is None else str(value)


def _same_param(logged: str, value: str) -> bool:
    """`mlflow run` records an empty -P value as the two characters '' (its shell quoting)."""
    return logged == value or (logged in ("''", '""') and value == "")


class RunLogger:
    """Everything a run logs, one method per kind of thing."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._epochs = _EpochWriter(run_id)
        self.model_id: str | None = None  # set by the release module once the model is logged
        self._beat: _Heartbeat | None = None

    def start_heartbeat(self) -> None:
        """Tag the run with this process (host, pid and start time) and a heartbeat every
        CUSHING_RUN_HEARTBEAT_S seconds, so the next command that meets the run after a SIGKILL marks it FAILED."""
        self._beat = _Heartbeat(self.run_id)
        self._beat.start()

    def note_checkpoint(self, path: Path, epoch: int, upload: bool = False) -> None:
        """Record the run's latest checkpoint (and upload it as the artifact checkpoint/checkpoint.pt if asked)."""
        import mlflow

        self.set_tags({"checkpoint_epoch": epoch, "checkpoint_host": socket.gethostname()})
        if upload:
            mlflow.log_artifact(str(path), "checkpoint")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params, keeping those `mlflow run` already logged from -P. A value that really differs from the one
        `mlflow run` logged (MLflow refuses to change a param) is logged as `resolved/<name>`."""
        import mlflow

        logged = client().get_run(self.run_id).data.params
        out = {}
        for k, v in params.items():
            text = _param_text(v)
            if k not in logged:
                out[k] = text
            elif not _same_param(logged[k], text) and f"resolved/{k}" not in logged:
                out[f"resolved/{k}"] = text
        items = list(out.items())
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            mlflow.log_params(dict(items[i:i + 100]))

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Queued for a background `log_batch` (one call per epoch, or fewer): the training loop never waits on the
        tracking server. Names get the `epoch/` prefix: `val/f1` of epoch 3 is `epoch/val/f1` at step 3."""
        self._epochs.put(epoch, {EPOCH_PREFIX + k: v for k, v in _clean(metrics).items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Final results, at step 0 by default; linked to the run's logged model once there is one (so the
        logged-model page, the Models tab and the registered version show them). A NaN (not estimable) stays on
        the run only: the logged-model page would draw it as 0."""
        import mlflow
        from mlflow.entities import Metric

        clean = _clean(metrics)
        finite = [(k, v) for k, v in clean.items() if math.isfinite(v)]
        for i in range(0, len(finite), 900):  # log_batch takes at most 1000 metrics per call
            mlflow.log_metrics(dict(finite[i:i + 900]), step=step, run_id=self.run_id, model_id=self.model_id)
        ts = int(time.time() * 1000)
        nan = [Metric(k, v, ts, step) for k, v in clean.items() if not math.isfinite(v)]
        for i in range(0, len(nan), 900):
            client().log_batch(self.run_id, metrics=nan[i:i + 900], synchronous=True)

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
        """The cohort as a run input: hashed subjects, split, sex and label only (no paths, no file names).

        Integer columns are logged as floats: MLflow's schema inference warns that an integer column cannot hold
        a missing value, and declaring them as doubles is the remedy it recommends. Concurrent workers logging
        the same dataset to one server can collide on its unique key; the loser retries and finds it."""
        import mlflow

        from mlflow.data.code_dataset_source import CodeDatasetSource

        table = table.astype({c: "float64" for c in table.columns if pd.api.types.is_integer_dtype(table[c])})
        source = CodeDatasetSource({"cohort_digest": digest, "note": "file paths withheld (faces are PHI)"})
        ds = mlflow.data.from_pandas(table, source=source, name=name, digest=digest[:36], targets="label")
        for attempt in range(4):
            try:
                mlflow.log_input(ds, context=context)
                return
            except Exception:  # e.g. a unique violation on the dataset row another worker just created
                if attempt == 3:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def nest_under(self, parent_run_id: str | None) -> None:
        """Show this run as a child of `parent_run_id` in the MLflow UI (used for the run `mlflow run` created,
        whose parent cannot be chosen when it is created). The UI nests runs only within one experiment; across
        experiments the run records the parent as `related_run` instead."""
        if not parent_run_id or parent_run_id == self.run_id:
            return
        c = client()
        same = c.get_run(parent_run_id).info.experiment_id == c.get_run(self.run_id).info.experiment_id
        self.set_tags({"mlflow.parentRunId" if same else "related_run": parent_run_id})

    def flush(self) -> None:
        """Wait until every queued epoch is written (raises if writing failed)."""
        self._epochs.flush()

    def close(self) -> None:
        try:
            self._epochs.close()
        finally:
            if self._beat is not None:
                self._beat.stop()


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


def env_run_id() -> str | None:
    """The run `mlflow run` created for this process, if any."""
    return os.environ.get("MLFLOW_RUN_ID") or None


@contextmanager
def _without_env_run() -> Iterator[None]:
    """For the whole life of a run that is not the one `mlflow run` created: mlflow.start_run() would resume
    MLFLOW_RUN_ID while it is set, and mlflow.end_run() unsets it, so hide it and put it back afterwards."""
    saved = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MLFLOW_RUN_ID"] = saved


def _open_run(experiment: str, run_name: str, parent_run_id: str | None, use_env_run: bool, run_id: str | None):
    import mlflow

    if run_id:  # continue an existing run (resume after a stop)
        return mlflow.start_run(run_id=run_id)
    env_run = env_run_id() if use_env_run and parent_run_id is None else None
    if env_run:
        os.environ.pop("MLFLOW_RUN_ID", None)  # taken: later runs of this process are new ones
        run = mlflow.start_run(run_id=env_run)
        mlflow.set_tag("mlflow.runName", run_name)
        actual = client().get_experiment(run.info.experiment_id).name
        if actual != experiment:
            import sys

            print(f"note: this run is in experiment {actual!r} (chosen by `mlflow run --experiment-name` or "
                  f"MLFLOW_EXPERIMENT_NAME), not {experiment!r}; promotion and reports look in the experiment you "
                  f"name, so pass --experiment-name {experiment}", file=sys.stderr)
        return run
    return mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name,
                            nested=parent_run_id is not None or mlflow.active_run() is not None,
                            parent_run_id=parent_run_id)


@contextmanager
def start_run(*, experiment: str, run_name: str, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None, use_env_run: bool = True,
              run_id: str | None = None) -> Iterator[RunLogger]:
    """A run in `experiment`: the one `mlflow run` created (MLFLOW_RUN_ID; taken once per process), `run_id`
    (continued), or a new (child) run. While it is open it beats (`RunLogger.start_heartbeat`).

    The run ends FAILED when the body raises, KILLED on Ctrl-C or SIGTERM (the interrupt carries the run id as
    `cushing_run` for the one-line message), else FINISHED.
    """
    configure()
    with contextlib.ExitStack() as keep:
        env = env_run_id()
        if not (env and use_env_run and parent_run_id is None and not run_id):
            keep.enter_context(_without_env_run())  # not `mlflow run`'s run: leave MLFLOW_RUN_ID for a later one
        with _run_lifecycle(experiment, run_name, tags, parent_run_id, use_env_run, run_id) as logger:
            yield logger


@contextmanager
def _run_lifecycle(experiment: str, run_name: str, tags: Mapping[str, Any] | None, parent_run_id: str | None,
                   use_env_run: bool, run_id: str | None) -> Iterator[RunLogger]:
    import mlflow

    run = _open_run(experiment, run_name, parent_run_id, use_env_run, run_id)
    logger = RunLogger(run.info.run_id)
    if tags:
        logger.set_tags(tags)
    status = "FINISHED"
    try:
        logger.start_heartbeat()
        yield logger
    except KeyboardInterrupt as e:
        status = "KILLED"
        if not getattr(e, "cushing_run", None):
            e.cushing_run = logger.run_id  # the innermost run: the one training when the signal came
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
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield configure()
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
        mlflow.set_tracking_uri(tracking_uri())  # point back only: opening the store is for whoever uses it


@contextmanager
def resume_run(run_id: str) -> Iterator[RunLogger]:
    """Log more into an existing run (CAMs computed later, a sweep's tables into its parent). Its status afterwards
    is the one it had: a FAILED or KILLED run is not turned FINISHED (and promotable) by it, and a run another
    process holds open stays RUNNING. An ended run beats while it is written, so a concurrent reap leaves it."""
    import mlflow

    configure()
    before = client().get_run(run_id).info.status
    with _without_env_run():
        mlflow.start_run(run_id=run_id)
        logger = RunLogger(run_id)
        try:
            if before != "RUNNING":
                logger.start_heartbeat()
            yield logger
        finally:
            try:
                logger.close()
            finally:
                mlflow.end_run(status=before)


@dataclass(frozen=True)
class RunRecord:
    """A run as the rest of the package reads it (nothing outside tracking/ and release/ sees an MLflow object)."""

    run_id: str
    name: str
    status: str  # RUNNING | FINISHED | FAILED | KILLED | SCHEDULED
    experiment_id: str
    start_time: int  # ms since the epoch
    end_time: int | None
    params: dict[str, str]
    metrics: dict[str, float]  # latest value of each metric
    tags: dict[str, str]

    @property
    def parent_run_id(self) -> str | None:
        return self.tags.get("mlflow.parentRunId")


def _record(run) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(info.run_id, data.tags.get("mlflow.runName", info.run_name or ""), info.status,
                     info.experiment_id, info.start_time, info.end_time, dict(data.params), dict(data.metrics),
                     dict(data.tags))


@contextmanager
def log_into(parent_run_id: str | None, *, experiment: str, run_name: str,
             tags: Mapping[str, Any] | None = None) -> Iterator[RunLogger]:
    """Where a step that works on other runs (a dashboard, a comparison) logs: the run `mlflow run` created, nested
    under `parent_run_id`; else `parent_run_id` itself; else a new run named `run_name`."""
    if parent_run_id and not env_run_id():
        with resume_run(parent_run_id) as r:
            yield r
        return
    with start_run(experiment=experiment, run_name=run_name, tags=tags) as r:
        r.nest_under(parent_run_id)
        yield r


def get_run(run_id: str) -> RunRecord:
    return _record(client().get_run(run_id))


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Tag any run, open or not, without touching the active run of this process."""
    c = client()
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def end_run_as(run_id: str, status: str, tags: Mapping[str, Any] | None = None) -> None:
    """Mark a run ended (FAILED, KILLED, FINISHED) from outside its process, with tags saying why."""
    if tags:
        set_tags(run_id, tags)
    client().set_terminated(run_id, status)


def list_artifacts(run_id: str, path: str | None = None) -> list[str]:
    """Artifact paths of a run (one folder level), e.g. ['cam/mean_all.png', 'cam/overlays']."""
    return [a.path for a in client().list_artifacts(run_id, path)]


def find_runs(experiment: str, *, filter_string: str = "", parent_run_id: str | None = None,
              max_results: int = 5000) -> list[RunRecord]:
    """Runs of an experiment (optionally the children of one parent), newest first. Runs whose process died are
    marked FAILED on the way (`reap`): the next command that meets a SIGKILLed run cleans it up."""
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    f = filter_string
    if parent_run_id:
        clause = f"tags.mlflow.parentRunId = '{parent_run_id}'"
        f = f"{f} and {clause}" if f else clause
    def search() -> list[RunRecord]:
        return [_record(r) for r in c.search_runs([exp.experiment_id], filter_string=f, max_results=max_results,
                                                   order_by=["attributes.start_time DESC"])]
    runs = search()
    return search() if reap(runs) else runs


def experiments_with_runs() -> list[tuple[str, int]]:
    """(experiment name, number of runs) for every experiment holding runs, most runs first: what an empty
    experiment's error message offers instead."""
    c = client()
    out = []
    for exp in c.search_experiments():
        n = len(c.search_runs([exp.experiment_id], max_results=1000))
        if n:
            out.append((exp.name, n))
    return sorted(out, key=lambda t: -t[1])


def log_artifacts_to(run_id: str, folder: str | Path, artifact_path: str | None = None) -> None:
    """Add files to any run, open or not, without touching the active run of this process."""
    client().log_artifacts(run_id, str(folder), artifact_path)


def last_step(run_id: str, key: str) -> int:
    """The highest step logged for a metric of a run (0 when none)."""
    return max((m.step for m in client().get_metric_history(run_id, key)), default=0)


def experiment_of_run(run_id: str) -> str:
    c = client()
    return c.get_experiment(c.get_run(run_id).info.experiment_id).name


def download_artifact(run_id: str, path: str, dst: str | Path) -> Path:
    import mlflow

    configure()
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))

