"""Optuna's RDB storage and the study in it: optuna imported (here and only through here), the storage opened with
heartbeats (its schema made under a lock) or to read only, the study's name (a digest of what it trains), its
MLflow parent run (created once, recorded in the study) and the study file checked for a command.

The grid on Optuna's own queue: opening a sweep (under the storage's lock: any number of launchers may open it at
once) creates or loads the study, enqueues every configuration once (its label as user attribute `label` and
parameter `configuration`, beside every option that varies across the grid) and creates the parent run once."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cushing import tracking
from cushing.config import EXECUTION_FIELDS, TrainConfig, config_digest
from cushing.tracking.stores import sqlalchemy_url, sqlite_path, store_lock
from cushing.workflows.studies import Study, load_study, with_execution

__all__ = ["MAX_RETRY", "default_storage", "StorageMissing", "load_for", "PARENT_ATTR", "grid_parameters",
           "GRID_PARAM"]


MAX_RETRY = 2  # deaths (not stops) of a configuration's workers that are retried; one more fails it for good
GRID_LAYOUT = "grid-v3"  # Optuna's queue: the label as user attribute and parameter, the varying fields (in the name)
PARENT_ATTR = "mlflow_parent_run"


def _beat() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds: a trial silent for the grace period is failed and retried."""
    return int(os.environ.get("CUSHING_HEARTBEAT_S", "5")), int(os.environ.get("CUSHING_GRACE_S", "20"))


def _optuna():
    try:
        import optuna
    except ImportError as e:  # pragma: no cover - pinned dependency
        raise ImportError("sweeps and tuning need optuna (pip install optuna==5.0.0)") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def default_storage() -> str:
    """CUSHING_OPTUNA_STORAGE, else a SQLite file next to the MLflow store (or in the working directory)."""
    if os.environ.get("CUSHING_OPTUNA_STORAGE"):
        return os.environ["CUSHING_OPTUNA_STORAGE"]
    path = sqlite_path(tracking.tracking_uri())
    return f"sqlite:///{(path.parent if path is not None else Path.cwd()) / 'optuna.db'}"


def _storage(url: str, retry_stale: bool = False):
    """Optuna's RDB storage with heartbeats (`retry_stale`: a stale trial is re-queued, at most MAX_RETRY times);
    its schema is created under a lock (two first launches on a fresh PostgreSQL database otherwise race: `type
    studydirection already exists`)."""
    optuna = _optuna()
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    url = sqlalchemy_url(url)
    heartbeat, grace = _beat()
    engine = {"connect_args": {"timeout": 60}} if sqlite_path(url) else {"pool_pre_ping": True}
    with warnings.catch_warnings(), store_lock(url, "optuna-schema"):
        warnings.simplefilter("ignore")  # the heartbeat API is marked experimental
        callback = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY) if retry_stale else None
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat,
                                          grace_period=grace, heartbeat_stale_trial_callback=callback)


def _close_storage(rdb) -> None:
    """Give an Optuna storage's database connections back (its engine stays usable: it reconnects if used)."""
    try:
        rdb.remove_session()
    finally:
        rdb.engine.dispose()


class StorageMissing(FileNotFoundError):
    """The Optuna storage named for reading holds no study (its SQLite file or its schema does not exist)."""


@contextmanager
def _read_storage(url: str) -> Iterator[Any]:
    """An existing Optuna storage, opened to read and closed after; a missing one is a `StorageMissing` error, never
    created (reading must not leave an empty store behind)."""
    import sqlalchemy as sa

    path = sqlite_path(sqlalchemy_url(url))
    if path is not None and not path.is_file():
        raise StorageMissing(f"no Optuna storage at {path}: no sweep or tuning study has run with this storage "
                             "(pass the one it used with --storage, or set CUSHING_OPTUNA_STORAGE)")
    probe = sa.create_engine(sqlalchemy_url(url))
    try:
        with probe.connect() as conn:
            has_schema = sa.inspect(conn).has_table("studies")
    finally:
        probe.dispose()
    if not has_schema:
        raise StorageMissing(f"the Optuna storage {_shown(url)} holds no study yet (no sweep or tuning study has "
                             "run with it)")
    rdb = _storage(url)
    try:
        yield rdb
    finally:
        _close_storage(rdb)


def _shown(url: str) -> str:
    """A storage URL fit for a message: without its password."""
    import sqlalchemy as sa

    try:
        return sa.engine.make_url(sqlalchemy_url(url)).render_as_string(hide_password=True)
    except Exception:
        return "(the configured storage)"


def _study_name(study: Study) -> str:
    """Name plus a digest of what it trains: editing the file starts a new study instead of mixing grids."""
    if study.kind == "sweep":
        ident = [GRID_LAYOUT] + [config_digest(c) for c in study.configurations]
    else:
        base = {k: v for k, v in study.base.items() if k not in EXECUTION_FIELDS}
        ident = [base, [dataclasses.asdict(p) for p in study.space], study.objective_metric]
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{study.kind}:{study.name}:{digest}"


def _name_metric(ostudy, study: Study) -> None:
    """The objective's name in the study (optuna-dashboard shows it instead of "Objective 0")."""
    if ostudy.metric_names != [study.objective_metric]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks set_metric_names experimental
            ostudy.set_metric_names([study.objective_metric])


def load_for(path: str | Path, kind: str, compile: str | None = None) -> Study:
    """The study file, checked to be a `kind` study, its experiment resolved (under `mlflow run`, checked to be the
    launcher's; unnamed: MLFLOW_EXPERIMENT_NAME, else `cushing`), with a command-line compile mode applied to it."""
    study = load_study(path)
    if study.kind != kind:
        raise ValueError(f"{path} is a {study.kind} study; use `cushing {study.kind}`")
    study = dataclasses.replace(study, experiment=tracking.resolve_experiment(
        study.experiment, f"{Path(path).name} trains in experiment"))
    return with_execution(study, compile=compile) if compile else study


def _parent_run(ostudy, study: Study, parent_run_id: str | None) -> str:
    """The study's parent run: `parent_run_id` when given, else the one recorded, else a new one (the run `mlflow
    run` created for this launch, when there is one). Called under the storage's lock."""
    if parent_run_id:
        if ostudy.user_attrs.get(PARENT_ATTR) != parent_run_id:
            ostudy.set_user_attr(PARENT_ATTR, parent_run_id)
        return parent_run_id
    existing = ostudy.user_attrs.get(PARENT_ATTR)  # read from the storage
    if existing:
        return existing
    with tracking.start_run(experiment=study.experiment, run_name=f"{study.kind}-{study.name}",
                            tags={"task": study.kind, "study": ostudy.study_name, "study_file": study.path.name}
                            ) as parent:
        parent.log_dict({"study": ostudy.study_name, "file": study.path.read_text()}, "study.json")
    ostudy.set_user_attr(PARENT_ATTR, parent.run_id)
    return parent.run_id


def _study_parent(study: Study, storage: str | None) -> str | None:
    """The parent run of a study file's Optuna study, if launched; the storage is read, never created
    (`StorageMissing`)."""
    optuna = _optuna()
    with _read_storage(storage or default_storage()) as rdb:
        try:
            return optuna.load_study(study_name=_study_name(study), storage=rdb).user_attrs.get(PARENT_ATTR)
        except KeyError:
            return None


GRID_PARAM = "configuration"  # the label, as a parameter: every configuration's parameters differ


def grid_parameters(study: Study) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(Optuna distributions, one params dict per configuration): the configuration's label and every training
    option that varies across the grid, with its real values (`freeze` resolved to what trains: DINOv2's auto is
    frozen)."""
    from optuna.distributions import CategoricalDistribution

    skip = set(EXECUTION_FIELDS) | {"experiment"}
    rows = [{GRID_PARAM: label, **dataclasses.asdict(c), "freeze": c.frozen}
            for label, c in zip(study.labels, study.configurations)]
    names = [GRID_PARAM] + [f.name for f in dataclasses.fields(TrainConfig) if f.name not in skip]
    dists = {n: CategoricalDistribution(list(dict.fromkeys(r[n] for r in rows))) for n in names}
    dists = {n: d for n, d in dists.items() if len(d.choices) > 1 or n == GRID_PARAM}
    return dists, [{k: r[k] for k in dists} for r in rows]


@dataclass
class _Grid:
    """An open sweep: the study file, the Optuna study and storage (and its URL), the parent run, the parameters."""

    study: Study
    ostudy: Any
    storage: Any
    url: str
    parent: str
    dists: dict[str, Any]
    params: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.ostudy.study_name

    def lock(self):
        """The storage's lock: whoever changes the queue holds it (nothing is enqueued twice)."""
        return store_lock(sqlalchemy_url(self.url), "sweep-queue")

    def close(self) -> None:
        _close_storage(self.storage)


def _open_grid(study: Study, url: str, parent_run_id: str | None = None) -> _Grid:
    optuna = _optuna()
    rdb = _storage(url, retry_stale=True)
    try:
        dists, params = grid_parameters(study)
        grid = _Grid(study, None, rdb, url, "", dists, params)
        with grid.lock():
            grid.ostudy = optuna.create_study(study_name=_study_name(study), storage=rdb, direction=study.direction,
                                              load_if_exists=True)
            _name_metric(grid.ostudy, study)
            for label, p in zip(study.labels, params):
                grid.ostudy.enqueue_trial(p, user_attrs={"label": label}, skip_if_exists=True)
            grid.parent = _parent_run(grid.ostudy, study, parent_run_id)
        return grid
    except BaseException:
        _close_storage(rdb)
        raise


@dataclass
class _Standing:
    """One configuration's trials: done, training, waiting in the queue, failed for good."""

    done: bool = False
    training: bool = False
    waiting: bool = False
    last: Any = None  # its latest trial

    @property
    def failed(self) -> bool:
        return not (self.done or self.training or self.waiting)


def _standings(grid: _Grid) -> dict[str, _Standing]:
    from optuna.trial import TrialState

    out = {label: _Standing() for label in grid.study.labels}
    for t in sorted(grid.ostudy.get_trials(deepcopy=False), key=lambda t: t.number):
        if (s := out.get(t.user_attrs.get("label"))) is None:
            continue
        s.done |= t.state == TrialState.COMPLETE
        s.training |= t.state == TrialState.RUNNING
        s.waiting |= t.state == TrialState.WAITING
        s.last = t
    return out
