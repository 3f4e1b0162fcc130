"""Sweeps (the paper's grid) and tuning, on Optuna's RDB storage so that many processes or hosts share one study.

Sweep: every configuration of the study file is trained exactly once, however many launchers and workers share
the storage. A worker claims a configuration by inserting (study, configuration, attempt) into a table whose
primary key lets one inserter win (`claims.GridClaims`), then creates the Optuna trial itself with the
configuration's real fields as parameters (every training option that varies across the grid: model, freeze,
batch_size, ...; the configuration's label is the trial's user attribute `label`), so optuna-dashboard and
`optuna trials` read sensibly. The trial beats from the moment it exists; its worker then checks that nobody took
the configuration over while it was starting (a later attempt claimed, another of its trials running) and gives
it up if so. A worker that dies stops beating; its trial is failed after the grace period and the configuration
is claimed again (attempt + 1) by a worker still alive: workers wait while others train, so a death is always
picked up. A trial left RUNNING with no heartbeat at all (its worker died between creating and beating it) is given
one by the next worker, so that it goes stale like any other. A configuration whose training raised is failed and
not retried (the error would repeat); one whose workers died more than MAX_RETRY times is failed for good. Stops
(Ctrl-C, SIGTERM, a Slurm preemption) are not failures: an interrupted attempt is retried by the next launch and
does not count against MAX_RETRY. Rerunning a finished sweep trains nothing.
Tune: TPE with median or successive-halving pruning on the per-epoch validation metric.
Every trial is a child MLflow run under one parent run per study. Optuna is imported here only.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from cushing import tracking
from cushing.tracking.stores import sqlalchemy_url, sqlite_path, store_lock
from cushing.workflows.claims import GridClaims
from cushing.stats.metrics import METRICS
from cushing.config import COHORT_FIELDS, EXECUTION_FIELDS, TrainConfig, config_digest
from cushing.model.engine import StopTraining
from cushing.workflows.studies import Study, load_study, with_execution
from cushing.model.backbones import interpolation_of
from cushing.model.train import prepare_cohort
from cushing.workflows.experiment import run_single
from cushing.workflows.plan import estimate, makespan

__all__ = ["run_sweep", "run_tune", "default_storage", "sweep_tables", "report_sweep", "SweepResult", "load_for",
           "plan_sweep", "auto_workers", "sweep_worker", "resolve_scope", "Scope", "default_experiment",
           "SweepHandle", "open_sweep", "sweep_status", "finish_sweep", "TuneHandle", "open_tune", "finish_tune",
           "StorageMissing"]

MAX_RETRY = 2  # deaths (not stops) of a configuration's workers that are retried; one more fails it for good
PARENT_KEY = "__parent_run__"  # the claim of creating a study's MLflow parent run
PARENT_CLAIM_TIMEOUT_S = 300.0  # a parent claim this old whose run was never recorded is claimed again
GRID_LAYOUT = "grid-v2"  # trial parameters: the configuration's label and its varying fields (part of the name)


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
    """Optuna's RDB storage with heartbeats; its schema is created under a lock (two first launches on a fresh
    PostgreSQL database otherwise race: `type studydirection already exists`)."""
    import warnings

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
    """An existing Optuna storage, opened to read and closed after: a missing SQLite file or a database without
    Optuna's schema is a `StorageMissing` error, never created (reading must not leave an empty store behind)."""
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


def _parent_run(ostudy, study: Study, claims: GridClaims, parent_run_id: str | None) -> str:
    """One MLflow parent run per Optuna study, recorded in the study so every worker and host logs under it.

    Exactly one launcher creates it (a claim); the parent is the run `mlflow run` created when there is one. The
    others wait for it to be recorded. A launcher that fails to create it (tracking server unreachable, refused,
    Ctrl-C) releases its claim, so the next launch creates it; a claim older than PARENT_CLAIM_TIMEOUT_S whose
    run was never recorded (its launcher was killed) is claimed again (attempt + 1) by a waiting launcher."""
    if parent_run_id:
        ostudy.set_user_attr("mlflow_parent_run", parent_run_id)
        return parent_run_id
    name, said = ostudy.study_name, False
    while True:
        existing = ostudy.user_attrs.get("mlflow_parent_run")  # read from the storage each time
        if existing:
            return existing
        last = claims.latest(name, PARENT_KEY)
        age = time.time() - last[1] if last else 0.0
        attempt = 0 if last is None else last[0] + 1 if age > PARENT_CLAIM_TIMEOUT_S else None
        if attempt is not None and claims.claim(name, PARENT_KEY, attempt):
            existing = ostudy.user_attrs.get("mlflow_parent_run")  # recorded late by a launcher thought dead
            return existing or _create_parent(ostudy, study, claims, attempt)
        if last and age > 10 and not said:
            print(f"[{study.kind} {study.name}] waiting for another launcher to create the parent run (claimed "
                  f"{age:.0f} s ago; claimed here if not recorded within {PARENT_CLAIM_TIMEOUT_S:.0f} s)", flush=True)
            said = True
        time.sleep(0.5)


def _create_parent(ostudy, study: Study, claims: GridClaims, attempt: int) -> str:
    """Create the parent run under this launcher's claim and record it in the study; on any failure give the
    claim back, so that a later launch is not left waiting for a parent that will never be recorded."""
    try:
        env = tracking.env_run_id()  # `mlflow run`'s run becomes the parent when it is in the study's experiment
        same = env is not None and tracking.experiment_of_run(env) == study.experiment
        with tracking.start_run(experiment=study.experiment, run_name=f"{study.kind}-{study.name}",
                                use_env_run=same, tags={"task": study.kind, "study": ostudy.study_name,
                                                        "study_file": study.path.name}) as parent:
            parent.log_dict({"study": ostudy.study_name, "file": study.path.read_text()}, "study.json")
            run_id = parent.run_id
        ostudy.set_user_attr("mlflow_parent_run", run_id)
    except BaseException:
        try:
            claims.release(ostudy.study_name, PARENT_KEY, attempt)
        except Exception:  # the storage is unreachable too: a later launch reclaims it after the timeout
            pass
        raise
    return run_id


def _study_parent(study: Study, storage: str | None) -> str | None:
    """The parent run of a study file's Optuna study in `storage`, if it has been launched. The storage is read,
    never created: a missing one is a `StorageMissing` error."""
    optuna = _optuna()
    with _read_storage(storage or default_storage()) as rdb:
        try:
            ostudy = optuna.load_study(study_name=_study_name(study), storage=rdb)
        except KeyError:
            return None
        return ostudy.user_attrs.get("mlflow_parent_run")


def _end_orphan(frozen_trial) -> None:
    """The MLflow child run of a trial whose worker died is marked FAILED, with the retry noted."""
    run_id = frozen_trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    try:
        if tracking.get_run(run_id).status == "RUNNING":
            tracking.end_run_as(run_id, "FAILED", {"worker_died": "heartbeat stale; the configuration was retried"})
    except Exception:  # the run may be gone; nothing to mark
        pass


# ------------------------------------------------------------------------------------------------ sweep

class _CohortMemo:
    """Decode each cohort once per worker process (configurations often share data and image size): one cohort
    per distinct value of COHORT_FIELDS and the backbone's interpolation."""

    def __init__(self):
        self.memo: dict[tuple, Any] = {}

    @staticmethod
    def key(cfg: TrainConfig) -> tuple:
        return (*(getattr(cfg, f) for f in COHORT_FIELDS), interpolation_of(cfg.model))

    def get(self, cfg: TrainConfig):
        key = self.key(cfg)
        if key not in self.memo:
            self.memo[key] = prepare_cohort(cfg, progress=False)
        return self.memo[key]


def _objective_value(metrics: dict[str, float], study: Study) -> float:
    """The trial's value: the objective metric, or the worst value when it is missing or not estimable."""
    value = metrics.get(study.objective_metric, math.nan)
    return value if math.isfinite(value) else (-1.0 if study.direction == "maximize" else 1e9)


def grid_parameters(study: Study) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(Optuna distributions, one params dict per configuration): every training option that varies across the
    grid, with its real values (`freeze` resolved to what trains: DINOv2's auto is frozen). The configuration's
    label is the trial's user attribute `label`."""
    from optuna.distributions import CategoricalDistribution

    skip = set(EXECUTION_FIELDS) | {"experiment"}
    rows = [{**dataclasses.asdict(c), "freeze": c.frozen} for c in study.configurations]
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in skip]
    dists: dict[str, Any] = {}
    for name in names:
        choices = list(dict.fromkeys(r[name] for r in rows))
        if len(choices) > 1:
            dists[name] = CategoricalDistribution(choices)
    return dists, [{k: r[k] for k in dists} for r in rows]


@dataclass
class _Grid:
    """An open sweep: the Optuna study and storage, the claims table, the parent run and the trial parameters."""

    study: Study
    ostudy: Any
    storage: Any
    claims: GridClaims
    parent: str
    dists: dict[str, Any]
    params: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.ostudy.study_name

    def close(self) -> None:
        """Give the claims' and the storage's database connections back (safe to call twice)."""
        try:
            self.claims.close()
        finally:
            _close_storage(self.storage)


def _open_grid(study: Study, storage: str, parent_run_id: str | None = None) -> _Grid:
    optuna = _optuna()
    rdb = _storage(storage)
    claims = None
    try:
        ostudy = optuna.create_study(study_name=_study_name(study), storage=rdb, direction=study.direction,
                                     load_if_exists=True)
        _name_metric(ostudy, study)
        claims = GridClaims(storage)
        dists, params = grid_parameters(study)
        return _Grid(study, ostudy, rdb, claims, _parent_run(ostudy, study, claims, parent_run_id), dists, params)
    except BaseException:
        if claims is not None:
            claims.close()
        _close_storage(rdb)
        raise


def _name_metric(ostudy, study: Study) -> None:
    """The objective's name in the study (optuna-dashboard shows it instead of "Objective 0")."""
    import warnings

    if ostudy.metric_names != [study.objective_metric]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks set_metric_names experimental
            ostudy.set_metric_names([study.objective_metric])


@dataclass
class _Attempts:
    """Where one configuration stands: done, training somewhere, failed for good, or which attempt to claim."""

    done: bool = False
    live: bool = False
    errored: bool = False
    next_attempt: int | None = 0
    deaths: int = 0  # attempts whose worker died (stops and attempts given up to another worker do not count)


# user attributes of a failed trial whose attempt does not count against MAX_RETRY: stopped (Ctrl-C, SIGTERM,
# preempted) or given up because another worker had taken the configuration over while it started
_NOT_DEATHS = ("interrupted", "superseded")


def _grid_trials(grid: _Grid) -> dict[tuple[str, int], Any]:
    """(label, attempt) -> the trial of that attempt."""
    return {(t.user_attrs.get("label"), int(t.system_attrs.get("grid_attempt", 0))): t
            for t in grid.ostudy.get_trials(deepcopy=False)}


def _attempts(grid: _Grid) -> dict[str, _Attempts]:
    """Every configuration's standing, from its claims and trials. A configuration is live while any of its trials
    runs (heartbeat-stale ones are failed first by the caller) or while its last claim, still without a trial, is
    younger than the grace period. It is dead otherwise; then attempt last + 1 may be claimed unless its
    training raised (the error would repeat) or its workers died more than MAX_RETRY times. A death is a trial
    failed without a stop or a give-up noted on it (heartbeat stale) or a claim that never got a trial."""
    from optuna.trial import TrialState

    _, grace = _beat()
    claims = grid.claims.claims(grid.name)
    trials = _grid_trials(grid)
    now = time.time()
    out = {}
    for label in grid.study.labels:
        a = _Attempts()
        tried = sorted(k[1] for k in claims if k[0] == label)
        if tried:
            mine = {k: trials.get((label, k)) for k in tried}
            age = {k: now - claims[(label, k)][1] for k in tried}
            a.done = any(t is not None and t.state == TrialState.COMPLETE for t in mine.values())
            a.errored = any(t is not None and t.state == TrialState.FAIL and "error" in t.user_attrs
                            for t in mine.values())
            starting = mine[tried[-1]] is None and age[tried[-1]] < grace
            a.live = any(t is not None and t.state == TrialState.RUNNING for t in mine.values()) or starting
            a.deaths = sum(1 for k, t in mine.items()
                           if (t is None and age[k] >= grace) or (t is not None and t.state == TrialState.FAIL
                                                                  and not any(x in t.user_attrs for x in _NOT_DEATHS)))
            dead = not (a.done or a.errored or a.live)
            a.next_attempt = tried[-1] + 1 if dead and a.deaths <= MAX_RETRY else None
        out[label] = a
    return out


@contextmanager
def _heartbeat(storage, trial_id: int) -> Iterator[None]:
    """Beat for a trial while its configuration trains, as Optuna's own optimize loop does."""
    interval, _ = _beat()
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a brief database outage: the next beat tries again
                pass
            if stop.wait(interval):
                return
    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _new_trial(grid: _Grid, label: str, attempt: int, retry_of: int | None):
    """A RUNNING trial with the configuration's real parameters (created directly: the claim already decided),
    beating at once: a trial without a heartbeat row is invisible to Optuna's stale check."""
    optuna = _optuna()
    from optuna.trial import FrozenTrial, TrialState

    storage = grid.storage
    params = grid.params[grid.study.labels.index(label)]
    system = {"grid_attempt": attempt, **({"retry_of": retry_of} if retry_of is not None else {})}
    template = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None,
                           datetime_start=dt.datetime.now(), datetime_complete=None, params=params,
                           distributions={k: grid.dists[k] for k in params}, user_attrs={"label": label},
                           system_attrs=system, intermediate_values={}, trial_id=-1)
    trial_id = storage.create_new_trial(storage.get_study_id_from_name(grid.name), template_trial=template)
    try:
        storage.record_heartbeat(trial_id)
    except Exception:  # a brief outage: the beat thread tries again, and a beatless trial is adopted (below)
        pass
    return optuna.trial.Trial(grid.ostudy, trial_id)


def _taken_over(grid: _Grid, label: str, attempt: int, trial_id: int) -> str | None:
    """Why a worker that has just created (and beaten) the trial of `attempt` must not train it, or None.

    Its claim may have looked dead while it started (creating a trial can wait out the database's busy timeout,
    longer than the grace period), so another worker may have claimed a later attempt, or a trial of this
    configuration may be running. Each side writes (its trial; its claim) before it reads the other's, so at
    least one of two such workers sees the other and gives up: never both train (rarely both give up, and the
    configuration is claimed again)."""
    from optuna.trial import TrialState

    later = sorted(k for (key, k) in grid.claims.claimed(grid.name) if key == label and k > attempt)
    if later:
        return f"attempt {later[-1]} of {label} was claimed while this one started"
    for (lbl, k), t in _grid_trials(grid).items():
        if lbl != label:
            continue
        if t._trial_id == trial_id:
            if t.state != TrialState.RUNNING:
                return f"trial {t.number} was failed (no heartbeat) while it started"
        elif t.state == TrialState.RUNNING:
            return f"trial {t.number} (attempt {k}) of {label} is training"
    return None


def _previous_trial(grid: _Grid, label: str, attempt: int) -> int | None:
    for t in grid.ostudy.get_trials(deepcopy=False):
        if t.user_attrs.get("label") == label and int(t.system_attrs.get("grid_attempt", 0)) == attempt - 1:
            return t.number
    return None


def _train_claimed(grid: _Grid, label: str, attempt: int, memo: _CohortMemo, progress: bool) -> float | None:
    """Train a claimed configuration as a trial; its objective value, or None when another worker had taken the
    configuration over while this one started (the trial is failed as `superseded`, not counted as a death)."""
    study = grid.study
    i = study.labels.index(label)
    retry_of = _previous_trial(grid, label, attempt) if attempt else None
    trial = _new_trial(grid, label, attempt, retry_of)
    cfg = dataclasses.replace(study.configurations[i], experiment=study.experiment, run_name=label)
    tags = {"sweep": study.name, "sweep_config": label, "optuna_trial": str(trial.number),
            **({"retry_of_trial": str(retry_of)} if retry_of is not None else {})}
    with _heartbeat(grid.storage, trial._trial_id):
        try:
            why = _taken_over(grid, label, attempt, trial._trial_id)
            if why:
                _fail_trial(grid, trial, "superseded", why)
                return None
            summary = run_single(cfg, cohort=memo.get(cfg), parent_run_id=grid.parent, progress=progress,
                                 extra_tags=tags, on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id))
        except BaseException as e:
            # stopped (SIGTERM, Ctrl-C, preempted): claimed again by the next worker and not counted against
            # MAX_RETRY; an exit from inside training is retried as a death; a training error would only repeat
            key = "interrupted" if isinstance(e, KeyboardInterrupt) else "exited" if isinstance(e, SystemExit) \
                else "error"
            _fail_trial(grid, trial, key, f"{type(e).__name__}: {e}"[:2000])
            raise
    value = _objective_value(summary.metrics, study)
    grid.ostudy.tell(trial, value)
    return value


def _fail_trial(grid: _Grid, trial, key: str, why: str) -> None:
    """Fail a trial with the reason under user attribute `key` (unless it was failed already, e.g. as stale)."""
    optuna = _optuna()
    from optuna.trial import TrialState

    try:
        trial.set_user_attr(key, why)
    except optuna.exceptions.UpdateFinishedTrialError:
        return
    grid.ostudy.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


def _say(grid: _Grid, text: str) -> None:
    print(f"[sweep {grid.study.name}] {text}", flush=True)


def sweep_worker(study: Study, storage: str, parent_run_id: str | None = None, progress: bool = False,
                 grid: _Grid | None = None) -> int:
    """Claim and train configurations until every one is done or failed for good; returns how many this worker
    trained. While others train the last ones, it waits, so that a configuration whose worker dies is retried."""
    if grid is None:
        grid = _open_grid(study, storage, parent_run_id)
        try:
            return _work(grid, progress)
        finally:
            grid.close()
    return _work(grid, progress)


def _work(grid: _Grid, progress: bool) -> int:
    study = grid.study
    memo, trained, n = _CohortMemo(), 0, len(study.labels)
    interval, _ = _beat()
    while True:
        _adopt_beatless(grid)
        for t in _fail_stale(grid.ostudy):
            _end_orphan(t)
        states = _attempts(grid)
        todo = [(label, a.next_attempt) for label, a in states.items() if a.next_attempt is not None]
        if not todo and not any(a.live for a in states.values()):
            return trained
        won = next(((label, k) for label, k in todo if grid.claims.claim(grid.name, label, k)), None)
        if won is None:
            time.sleep(min(interval, 2.0))  # the rest are training elsewhere: wait, in case a worker dies
            continue
        label, attempt = won
        done = sum(a.done for a in states.values())
        _say(grid, f"configuration {study.labels.index(label) + 1}/{n} {label}: training"
                   f"{f' (attempt {attempt + 1})' if attempt else ''}; {done}/{n} done")
        value = _train_claimed(grid, label, attempt, memo, progress)
        if value is None:
            _say(grid, f"configuration {study.labels.index(label) + 1}/{n} {label}: another worker took it over "
                       "while this one started; not training it here")
            continue
        trained += 1
        done = sum(a.done for a in _attempts(grid).values())
        _say(grid, f"configuration {study.labels.index(label) + 1}/{n} {label}: {study.objective_metric} "
                   f"{value:.4f}; {done}/{n} done")


def _adopt_beatless(grid: _Grid) -> list[int]:
    """Give a heartbeat to every RUNNING trial of the grid that has none although it started more than the grace
    period ago (its worker died between creating the trial and its first beat). Optuna's stale check skips
    trials without a heartbeat, so such a trial would count as training forever; with one, it goes stale one
    grace period later unless its worker, alive after all, beats it (a heartbeat rather than failing it at once:
    nothing is lost if that worker is only slow). Returns the trial ids adopted."""
    import sqlalchemy as sa
    from optuna.storages._rdb.models import TrialHeartbeatModel
    from optuna.trial import TrialState

    _, grace = _beat()
    old = dt.datetime.now() - dt.timedelta(seconds=grace)
    running = {t._trial_id for t in grid.ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.datetime_start is not None and t.datetime_start < old}
    if not running:
        return []
    hb = TrialHeartbeatModel.__table__
    with grid.storage.engine.connect() as conn:
        beaten = {r[0] for r in conn.execute(sa.select(hb.c.trial_id).where(hb.c.trial_id.in_(running)))}
    adopted = sorted(running - beaten)
    for trial_id in adopted:
        grid.storage.record_heartbeat(trial_id)  # a concurrent first beat of the same trial is ignored by Optuna
    return adopted


def _fail_stale(ostudy) -> list:
    """Fail trials whose worker stopped beating (sweeps claim their retries; tuning re-queues them)."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    import warnings

    before = {t.number for t in ostudy.get_trials(deepcopy=False) if t.state == TrialState.FAIL}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the heartbeat API is marked experimental
        fail_stale_trials(ostudy)
    return [t for t in ostudy.get_trials(deepcopy=False) if t.state == TrialState.FAIL and t.number not in before]


@dataclass
class SweepResult:
    parent_run_id: str
    study_name: str
    trained: int
    table2: pd.DataFrame
    table3: pd.DataFrame
    retried: list[dict]
    seconds: float


def _spawn_workers(path: Path, storage: str, parent: str, n: int, compile: str | None) -> list[int]:
    """N worker processes; the storage URL (which may hold a password) reaches them through the environment,
    never their command line (which every account on the host can read). A stop (SIGTERM, Ctrl-C) is passed on
    (`_stop_workers`)."""
    env = dict(os.environ)
    env.pop("MLFLOW_RUN_ID", None)  # workers log children of the parent, not into an `mlflow run` run
    env["CUSHING_OPTUNA_STORAGE"] = storage
    extra = ["--compile", compile] if compile else []
    procs = [subprocess.Popen([sys.executable, "-m", "cushing", "sweep", str(path), "--parent-run", parent,
                               "--worker", *extra], env=env) for _ in range(n)]
    try:
        return [p.wait() for p in procs]
    except KeyboardInterrupt as e:
        _stop_workers(procs, forward=getattr(e, "signame", "SIGINT") != "SIGINT")
        raise


def _stop_grace() -> float:
    """Seconds a stopped launcher gives its workers at each step (CUSHING_STOP_GRACE_S, default 30)."""
    return float(os.environ.get("CUSHING_STOP_GRACE_S", "30"))


def _stop_workers(procs: list[subprocess.Popen], forward: bool) -> None:
    """Stop the workers of an interrupted launcher without interrupting their own clean-up.

    Ctrl-C reaches every process of the terminal's foreground group: the workers got their own SIGINT and are
    already failing their trial as `interrupted` and ending their MLflow run KILLED; a second signal now would land
    in that clean-up and leave both RUNNING. So they are given the grace period to exit on their own, then sent
    SIGTERM, and SIGKILLed only after a further grace period. A SIGTERM (docker stop, a scheduler, `kill`) usually
    reaches the launcher alone, so it is passed on at once (`forward`), and SIGKILL follows after the grace period.
    Another Ctrl-C while waiting moves on to the next step at once."""
    grace = _stop_grace()
    steps = ([] if forward else [None]) + [subprocess.Popen.terminate, subprocess.Popen.kill]
    for step in steps:
        alive = [p for p in procs if p.poll() is None]
        if not alive:
            return
        if step is not None:
            for p in alive:
                step(p)
        if step is subprocess.Popen.kill:
            for p in alive:
                p.wait()
            return
        try:
            deadline = time.monotonic() + grace
            for p in alive:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    break
        except KeyboardInterrupt:
            continue


def auto_workers() -> int:
    """Trainings at once on this host when not told: two on a CUDA machine (two paper-sized trainings share one
    GPU at 1.5x the throughput of one, ../shared/bench/gpu_ceiling_h200_2026-11-26.json), one on a CPU."""
    import torch

    return 2 if torch.cuda.is_available() else 1


def load_for(path: str | Path, kind: str, compile: str | None = None) -> Study:
    """The study file, checked to be a `kind` study, with a command-line compile mode applied to it."""
    study = load_study(path)
    if study.kind != kind:
        raise ValueError(f"{path} is a {study.kind} study; use `cushing {study.kind}`")
    return with_execution(study, compile=compile) if compile else study


@dataclass
class SweepHandle:
    """An open sweep that launchers (local processes, a Slurm job array) feed with workers."""

    study: Study
    storage: str  # the Optuna storage URL every worker must use
    grid: _Grid
    launcher_run: str | None  # the run `mlflow run` created for this launch, if any
    started: float

    @property
    def parent_run_id(self) -> str:
        return self.grid.parent

    @property
    def study_name(self) -> str:
        return self.grid.name


def open_sweep(path: str | Path, *, storage: str | None = None, parent_run_id: str | None = None,
               compile: str | None = None) -> SweepHandle:
    """Load the study file, open (or create) its Optuna study and parent run: what every launcher does first."""
    study = load_for(path, "sweep", compile)
    launcher_run = tracking.env_run_id()  # read before the parent run may take it
    storage = storage or default_storage()
    return SweepHandle(study, storage, _open_grid(study, storage, parent_run_id), launcher_run, time.perf_counter())


def sweep_status(h: SweepHandle) -> dict[str, Any]:
    """Where the grid stands (for progress lines): configurations done, training, failed for good, waiting."""
    states = _attempts(h.grid)
    return {"n": len(states), "done": sum(a.done for a in states.values()),
            "training": sum(a.live for a in states.values()),
            "failed": sorted(k for k, a in states.items() if a.errored or (a.next_attempt is None and not a.done
                                                                         and not a.live)),
            "finished": all(a.done or a.errored or (a.next_attempt is None and not a.live) for a in states.values())}


def finish_sweep(h: SweepHandle, trained: int = -1) -> SweepResult:
    """Tables II and III and the retries on the parent run (and this launch's own run under `mlflow run`)."""
    t2, t3 = sweep_tables(h.grid.parent, h.study)
    retried = _retries(h.grid.ostudy)
    done = sweep_status(h)["done"]
    seconds = time.perf_counter() - h.started
    _log_tables(h.grid.parent, t2, t3, retried, seconds, done, len(h.study.labels))
    if h.launcher_run and h.launcher_run != h.grid.parent:
        _log_pass(h.launcher_run, h.grid, trained, done)
    h.grid.close()
    return SweepResult(h.grid.parent, h.grid.name, trained, t2, t3, retried, seconds)


def run_sweep(path: str | Path, *, storage: str | None = None, workers: int | None = None, progress: bool = True,
              parent_run_id: str | None = None, compile: str | None = None) -> SweepResult:
    """The whole grid: this process (workers=1) or N worker processes on one storage; then the tables.

    workers=None takes `auto_workers()`. `compile` (a torch.compile mode) overrides the file's for every
    configuration; it does not change the study's identity, so a sweep can be resumed with or without it.
    Under `mlflow run`, the run it created becomes the study's parent on the first launch, and on later launches
    a child of that parent recording what this launch trained."""
    h = open_sweep(path, storage=storage, parent_run_id=parent_run_id, compile=compile)
    try:
        workers = workers or auto_workers()
        if workers > 1:
            codes = _spawn_workers(h.study.path, h.storage, h.grid.parent, workers, compile)
            trained = -1
            if any(codes):
                raise RuntimeError(f"sweep workers exited with {codes}")
        else:
            trained = sweep_worker(h.study, h.storage, progress=progress, grid=h.grid)
        return finish_sweep(h, trained)
    finally:
        h.grid.close()


def _log_pass(run_id: str, grid: _Grid, trained: int, done: int) -> None:
    """A later `mlflow run -e sweep` on a study that already has its parent: its run becomes a child of that
    parent saying what this pass did, instead of an empty top-level run."""
    with tracking.resume_run(run_id) as r:
        r.nest_under(grid.parent)
        r.set_tags({"mlflow.runName": f"sweep-{grid.study.name}-pass", "task": "sweep-pass", "study": grid.name})
        r.log_metrics({"sweep/configurations_done": float(done), "sweep/trained_here": float(max(trained, 0))})


def _retries(ostudy) -> list[dict]:
    out = []
    for t in ostudy.get_trials(deepcopy=False):
        if "retry_of" in t.system_attrs or "failed_trial" in t.system_attrs:
            out.append({"trial": t.number, "retry_of": t.system_attrs.get("retry_of", t.system_attrs.get(
                "failed_trial")), "config": t.user_attrs.get("label", t.params.get("config")),
                "state": t.state.name})
    return out


def _log_tables(parent: str, t2: pd.DataFrame, t3: pd.DataFrame, retried: list[dict], seconds: float,
                done: int, n: int) -> None:
    with tracking.resume_run(parent) as r:
        r.log_table(t2, "table2.csv")
        r.log_table(t3, "table3.csv")
        if retried:
            r.log_table(pd.DataFrame(retried), "retried_trials.csv")
        r.log_metrics({"sweep/configurations_done": float(done), "sweep/configurations": float(n),
                       "sweep/retried_trials": float(len(retried)), "sweep/last_pass_seconds": seconds,
                       **_best_of(t2)})


def _best_of(t2: pd.DataFrame) -> dict[str, float]:
    """The top configuration's (ranked on validation) final test results on the parent, under `best/`, so the
    parent shows numbers in the MLflow UI's chart and compare views without expanding the sweep."""
    if t2.empty:
        return {}
    top = t2.iloc[0]
    out = {f"best/{c}": float(top[c]) for c in t2.columns if c.startswith("test/") and not c.endswith(("ci_low",
                                                                                                   "ci_high"))}
    rank_col = next(c for c in t2.columns if c.startswith("rank_by"))
    out[f"best/{rank_col[len('rank_by ('):-1]}"] = float(top[rank_col])
    return {k: v for k, v in out.items() if math.isfinite(v)}


def plan_sweep(path: str | Path, workers: list[int], compile: str | None = None
               ) -> tuple[pd.DataFrame, dict[int, float]]:
    """Per-configuration estimates (H200 seconds; `schedule`) and the estimated wall time per worker count."""
    study = load_for(path, "sweep", compile)
    est = [estimate(c) for c in study.configurations]
    table = pd.DataFrame({"configuration": study.labels, "compile_s": [e.compile_s for e in est],
                          "train_s": [e.gpu_s for e in est], "other_s": [e.overhead_s for e in est],
                          "total_s": [e.total_s for e in est]})
    return table, {w: makespan(est, w) for w in workers}


# ------------------------------------------------------------------------------------------------ tables



def _children(parent: str, experiment: str) -> list:
    runs = tracking.find_runs(experiment, parent_run_id=parent)
    return [r for r in runs if r.status == "FINISHED" and r.tags.get("sweep_config")]


def sweep_tables(parent: str, study: Study) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table II (overall) and Table III (per sex) from the finished children, ranked on validation."""
    rows2, rows3 = [], []
    metric = study.objective_metric
    latest: dict[str, Any] = {}
    for r in sorted(_children(parent, study.experiment), key=lambda r: r.start_time):
        latest[r.tags["sweep_config"]] = r  # a retried configuration counts once: its last finished run
    for label, r in latest.items():
        m, t = r.metrics, r.tags
        row = {"configuration": label, "model": t.get("model"), "type": t.get("model_type"),
               "freeze": t.get("freeze"), f"rank_by ({metric})": m.get(metric, math.nan)}
        for k in METRICS:
            row[f"test/{k}"] = m.get(f"test/{k}", math.nan)
            row[f"test/{k}/ci_low"] = m.get(f"test/{k}/ci_low", math.nan)
            row[f"test/{k}/ci_high"] = m.get(f"test/{k}/ci_high", math.nan)
        row["test_argmax/f1"] = m.get("test_argmax/f1", math.nan)
        row["run_id"] = r.run_id
        rows2.append(row)
        for group in ("female", "male"):
            g = {"configuration": label, "model": t.get("model"), "group": group,
                 f"rank_by ({metric})": m.get(metric, math.nan)}
            for k in METRICS:
                v = m.get(f"test/{k}/{group}", math.nan)
                g[f"test/{k}"] = v if math.isfinite(v) else "not estimable"
            rows3.append(g)
    t2 = pd.DataFrame(rows2)
    t3 = pd.DataFrame(rows3)
    if not t2.empty:
        key = f"rank_by ({metric})"
        t2 = t2.sort_values(key, ascending=study.direction == "minimize", na_position="last").reset_index(drop=True)
        t2.insert(0, "rank", range(1, len(t2) + 1))
        order = {c: i for i, c in enumerate(t2["configuration"])}
        t3 = t3.sort_values(["configuration", "group"], key=lambda s: s.map(order) if s.name == "configuration"
                            else s).reset_index(drop=True)
    return t2, t3


def report_sweep(path: str | Path, storage: str | None = None) -> tuple[str | None, pd.DataFrame, pd.DataFrame]:
    """The tables of a sweep from the tracking store, at any time (also while it runs); no parent (None) when the
    study has not been launched in `storage`. A storage that does not exist is a `StorageMissing` error (it is
    read, never created)."""
    study = load_for(path, "sweep")
    parent = _study_parent(study, storage)
    if not parent:
        return None, pd.DataFrame(), pd.DataFrame()
    t2, t3 = sweep_tables(parent, study)
    return parent, t2, t3


@dataclass(frozen=True)
class Scope:
    """Which runs a utility command (promote, dashboard) looks at, and how that was decided."""

    experiment: str
    parent_run_id: str | None
    how: str


def default_experiment() -> str:
    """MLFLOW_EXPERIMENT_NAME, else the experiment of the run `mlflow run` created, else `cushing`."""
    if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return os.environ["MLFLOW_EXPERIMENT_NAME"]
    run = tracking.env_run_id()
    return tracking.experiment_of_run(run) if run else "cushing"


def resolve_scope(*, experiment: str | None = None, parent_run_id: str | None = None, project: str | None = None,
                  storage: str | None = None) -> Scope:
    """The experiment (and sweep parent) a user means: a parent run's own experiment; a study file's experiment
    and the parent run of its study in the Optuna storage; else the experiment named, else the default."""
    if parent_run_id:
        return Scope(tracking.experiment_of_run(parent_run_id), parent_run_id, f"parent run {parent_run_id}")
    if project:
        study = load_study(project)
        try:
            parent = _study_parent(study, storage)
        except StorageMissing:  # nothing launched with this storage: the study file's experiment, read as is
            parent = None
        return Scope(experiment or study.experiment, parent,
                     f"study {study.path.name}" + (f" (parent run {parent})" if parent else " (not launched yet)"))
    name = experiment or default_experiment()
    return Scope(name, None, f"experiment {name!r}")


# ------------------------------------------------------------------------------------------------ tune

def _sampler(study: Study):
    optuna = _optuna()
    s = dict(study.sampler)
    kind = s.pop("type", "tpe")
    if kind == "random":
        return optuna.samplers.RandomSampler(**s)
    return optuna.samplers.TPESampler(**{"seed": 0, **s})


def _pruner(study: Study):
    optuna = _optuna()
    p = dict(study.pruner)
    kind = p.pop("type", "median")
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**p)
    if kind == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(**{"n_startup_trials": 2, "n_warmup_steps": 2, **p})


def _suggest(trial, study: Study) -> dict[str, Any]:
    out = {}
    for p in study.space:
        if p.type == "categorical":
            out[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.type == "int":
            out[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
    return out


def _tune_objective(study: Study, parent: str, memo: _CohortMemo, progress: bool):
    optuna = _optuna()

    per_epoch = study.objective_metric

    def objective(trial) -> float:
        params = _suggest(trial, study)
        cfg = study.config_for({**params, "run_name": f"{study.name}-trial{trial.number}"})
        cfg = dataclasses.replace(cfg, experiment=study.experiment)

        def report(epoch: int, metrics: dict[str, float]) -> None:
            v = metrics.get(per_epoch)
            if v is None or not math.isfinite(v):
                return
            trial.report(v, epoch)
            if trial.should_prune():
                raise StopTraining(f"pruned by {type(trial.study.pruner).__name__} at epoch {epoch}")
        summary = run_single(cfg, cohort=memo.get(cfg), parent_run_id=parent, progress=progress, on_epoch=report,
                             extra_tags={"tune": study.name, "optuna_trial": str(trial.number)},
                             on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id))
        if summary.stopped.startswith("pruned"):
            tracking.set_tags(summary.run_id, {"pruned": summary.stopped})
            raise optuna.TrialPruned(summary.stopped)
        return _objective_value(summary.metrics, study)
    return objective


@dataclass
class TuneResult:
    parent_run_id: str
    study_name: str
    best_params: dict[str, Any]
    best_value: float
    importances: pd.DataFrame
    n_complete: int
    n_pruned: int


@dataclass
class TuneHandle:
    """An open tuning study (and its parent run) that launchers feed with trials."""

    study: Study
    ostudy: Any
    parent_run_id: str
    launcher_run: str | None
    storage: Any = None  # the Optuna RDB storage (closed by run_tune when done)


def open_tune(path: str | Path, *, storage: str | None = None, parent_run_id: str | None = None,
              compile: str | None = None) -> TuneHandle:
    """Load the study file, open (or create) its Optuna study and parent run: what every tuning launcher does."""
    optuna = _optuna()
    study = load_for(path, "tune", compile)
    storage = storage or default_storage()
    launcher_run = tracking.env_run_id()
    rdb = _storage(storage, retry_stale=True)
    try:
        ostudy = optuna.create_study(study_name=_study_name(study), storage=rdb, sampler=_sampler(study),
                                     pruner=_pruner(study), direction=study.direction, load_if_exists=True)
        _name_metric(ostudy, study)
        with GridClaims(storage) as claims:
            parent = _parent_run(ostudy, study, claims, parent_run_id)
    except BaseException:
        _close_storage(rdb)
        raise
    return TuneHandle(study, ostudy, parent, launcher_run, rdb)


def run_tune(path: str | Path, *, storage: str | None = None, n_trials: int | None = None, progress: bool = True,
             parent_run_id: str | None = None, compile: str | None = None) -> TuneResult:
    """This worker's `n_trials` of the study (any number of workers and hosts may share the storage)."""
    h = open_tune(path, storage=storage, parent_run_id=parent_run_id, compile=compile)
    try:
        for t in _fail_stale(h.ostudy):
            _end_orphan(t)
        n = n_trials or h.study.n_trials
        h.ostudy.optimize(_tune_objective(h.study, h.parent_run_id, _CohortMemo(), progress), n_trials=n, catch=(),
                          callbacks=[_tune_progress(h.study.name, n)])
        result = finish_tune(h)
    finally:
        _close_storage(h.storage)
    if h.launcher_run and h.launcher_run != h.parent_run_id:
        with tracking.resume_run(h.launcher_run) as r:
            r.nest_under(h.parent_run_id)
            r.set_tags({"mlflow.runName": f"tune-{h.study.name}-pass", "task": "tune-pass",
                        "study": h.ostudy.study_name})
            r.log_metrics({"tune/trials_here": float(n), "tune/complete": float(result.n_complete)})
    return result


def _tune_progress(name: str, n: int):
    count = {"i": 0}

    def callback(ostudy, trial) -> None:
        count["i"] += 1
        value = "pruned" if trial.value is None else f"{trial.value:.4f}"
        print(f"[tune {name}] trial {count['i']}/{n} (study trial {trial.number}): {value}", flush=True)
    return callback


def finish_tune(h: TuneHandle) -> TuneResult:
    """Best parameters, importances and the trials table on the parent run."""
    optuna = _optuna()
    ostudy, study, parent = h.ostudy, h.study, h.parent_run_id
    from optuna.trial import TrialState

    complete = [t for t in ostudy.trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in ostudy.trials if t.state == TrialState.PRUNED]
    imp = pd.DataFrame(columns=["parameter", "importance"])
    if len(complete) >= 2:
        try:
            values = optuna.importance.get_param_importances(ostudy)
            imp = pd.DataFrame({"parameter": list(values), "importance": list(values.values())})
        except (RuntimeError, ValueError) as e:  # e.g. a parameter that never varied
            imp = pd.DataFrame({"parameter": ["(not computable)"], "importance": [math.nan], "why": [str(e)]})
    best = ostudy.best_trial if complete else None
    trials = ostudy.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs"))
    with tracking.resume_run(parent) as r:
        r.log_table(trials, "trials.csv")
        r.log_table(imp, "param_importances.csv")
        if best is not None:
            r.log_dict(best.params, "best_params.json")
            r.log_metrics({f"best/{study.objective_metric}": best.value, "tune/complete": float(len(complete)),
                           "tune/pruned": float(len(pruned))})
            r.set_tags({"best_trial": str(best.number), "best_run": best.user_attrs.get("mlflow_run_id", ""),
                        **{f"best_param/{k}": str(v) for k, v in best.params.items()}})
    return TuneResult(parent, ostudy.study_name, dict(best.params) if best else {}, best.value if best else math.nan,
                      imp, len(complete), len(pruned))
