"""Sweeps (the paper's grid) and tuning, on Optuna's RDB storage so that many processes or hosts share one study.

Sweep: a GridSampler over the study file's configurations. Optuna numbers trials atomically in its storage and the
grid sampler maps the first n trial numbers one-to-one onto the n grid points, so workers never train a
configuration twice; a worker that dies leaves a trial whose heartbeat goes stale, which is failed and re-queued
(RetryHeartbeatStaleTrialCallback) and reported. Rerunning a finished sweep trains nothing.
Tune: TPE with median or successive-halving pruning on the per-epoch validation metric.
Every trial is a child MLflow run under one parent run per study. Optuna is imported here only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from . import tracking
from .config import TrainConfig
from .engine import StopTraining
from .studies import EXECUTION_FIELDS, Study, config_digest, load_study, with_execution

__all__ = ["run_sweep", "run_tune", "default_storage", "sweep_tables", "report_sweep", "SweepResult", "load_for",
           "plan_sweep", "auto_workers"]

MAX_RETRY = 2


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
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    return f"sqlite:///{Path.cwd() / 'optuna.db'}"


def _storage(url: str):
    import warnings

    optuna = _optuna()
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    heartbeat, grace = _beat()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=heartbeat, grace_period=grace,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))


def _study_name(study: Study) -> str:
    """Name plus a digest of what it trains: editing the file starts a new study instead of mixing grids."""
    if study.kind == "sweep":
        ident = [config_digest(c) for c in study.configurations]
    else:
        base = {k: v for k, v in study.base.items() if k not in EXECUTION_FIELDS}
        ident = [base, [dataclasses.asdict(p) for p in study.space], study.objective_metric]
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{study.kind}:{study.name}:{digest}"


def _parent_run(ostudy, study: Study, parent_run_id: str | None) -> str:
    """One MLflow parent run per Optuna study, recorded in the study so every worker and host logs under it."""
    if parent_run_id:
        ostudy.set_user_attr("mlflow_parent_run", parent_run_id)
        return parent_run_id
    existing = ostudy.user_attrs.get("mlflow_parent_run")
    if existing:
        return existing
    with tracking.start_run(experiment=study.experiment, run_name=f"{study.kind}-{study.name}", use_env_run=True,
                            tags={"task": study.kind, "study": ostudy.study_name,
                                  "study_file": study.path.name}) as parent:
        parent.log_dict({"study": ostudy.study_name, "file": study.path.read_text()}, "study.json")
        run_id = parent.run_id
    ostudy.set_user_attr("mlflow_parent_run", run_id)
    time.sleep(0.5)  # two first workers racing: the last writer wins, the loser's empty parent is removed
    winner = ostudy.user_attrs.get("mlflow_parent_run", run_id)
    if winner != run_id:
        tracking.client().delete_run(run_id)
    return winner


def _end_orphan(frozen_trial) -> None:
    """The MLflow child run of a trial whose worker died is marked FAILED, with the retry noted."""
    run_id = frozen_trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    c = tracking.client()
    try:
        if c.get_run(run_id).info.status == "RUNNING":
            c.set_tag(run_id, "worker_died", "heartbeat stale; the configuration was retried")
            c.set_terminated(run_id, "FAILED")
    except Exception:  # the run may be gone; nothing to mark
        pass


# ------------------------------------------------------------------------------------------------ sweep

class _CohortMemo:
    """Decode each cohort once per worker process (configurations often share data and image size)."""

    def __init__(self):
        self.memo: dict[tuple, Any] = {}

    def get(self, cfg: TrainConfig):
        from .backbones import interpolation_of
        from .train import prepare_cohort

        key = (cfg.data, cfg.img_size, cfg.split_ratios, cfg.split_seed, interpolation_of(cfg.model))
        if key not in self.memo:
            self.memo[key] = prepare_cohort(cfg, progress=False)
        return self.memo[key]


def _objective_value(metrics: dict[str, float], study: Study) -> float:
    """The trial's value: the objective metric, or the worst value when it is missing or not estimable."""
    value = metrics.get(study.objective_metric, math.nan)
    return value if math.isfinite(value) else (-1.0 if study.direction == "maximize" else 1e9)


def _sweep_objective(study: Study, parent: str, memo: _CohortMemo, progress: bool):
    from .experiment import run_single

    n = len(study.configurations)

    def objective(trial) -> float:
        i = trial.suggest_categorical("config", list(range(n)))
        cfg = dataclasses.replace(study.configurations[i], experiment=study.experiment,
                                  run_name=study.labels[i])
        trial.set_user_attr("label", study.labels[i])
        retried = trial.study._storage.get_trial(trial._trial_id).system_attrs.get("failed_trial")
        tags = {"sweep": study.name, "sweep_config": study.labels[i], "optuna_trial": str(trial.number),
                **({"retry_of_trial": str(retried)} if retried is not None else {})}
        summary = run_single(cfg, cohort=memo.get(cfg), parent_run_id=parent, progress=progress, extra_tags=tags,
                             on_start=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id))
        return _objective_value(summary.metrics, study)
    return objective


def _open(study: Study, storage: str, sampler):
    optuna = _optuna()
    return optuna.create_study(study_name=_study_name(study), storage=_storage(storage), sampler=sampler,
                               direction=study.direction, load_if_exists=True)


def _open_grid(study: Study, storage: str):
    optuna = _optuna()
    n = len(study.configurations)
    return _open(study, storage, optuna.samplers.GridSampler({"config": list(range(n))}, seed=0))


def _sweep_state(ostudy) -> tuple[int, int, bool]:
    """(grid points finished, trials started or queued ignoring failed attempts, any queued retry)."""
    from optuna.trial import TrialState

    trials = ostudy.get_trials(deepcopy=False)
    done = {t.params.get("config") for t in trials if t.state == TrialState.COMPLETE}
    live = sum(t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING, TrialState.PRUNED)
               for t in trials)
    return len(done), live, any(t.state == TrialState.WAITING for t in trials)


def sweep_worker(study: Study, storage: str, parent_run_id: str | None = None, progress: bool = False) -> int:
    """Train configurations until the grid is covered; returns how many this worker trained."""
    n = len(study.configurations)
    ostudy = _open_grid(study, storage)
    objective = _sweep_objective(study, _parent_run(ostudy, study, parent_run_id), _CohortMemo(), progress)
    trained = 0
    while True:
        for t in _fail_stale(ostudy):
            _end_orphan(t)
        done, live, waiting = _sweep_state(ostudy)
        if done >= n or (live >= n and not waiting):
            return trained
        ostudy.optimize(objective, n_trials=1, catch=())
        trained += 1


def _fail_stale(ostudy) -> list:
    """Fail trials whose worker stopped beating (their retries are queued by the storage's callback)."""
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
    env = dict(os.environ)
    env.pop("MLFLOW_RUN_ID", None)  # workers log children of the parent, not into an `mlflow run` run
    extra = ["--compile", compile] if compile else []
    procs = [subprocess.Popen([sys.executable, "-m", "cushing", "sweep", str(path), "--storage", storage,
                               "--parent-run", parent, "--worker", *extra], env=env) for _ in range(n)]
    return [p.wait() for p in procs]


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


def run_sweep(path: str | Path, *, storage: str | None = None, workers: int | None = None, progress: bool = True,
              parent_run_id: str | None = None, compile: str | None = None) -> SweepResult:
    """The whole grid: this process (workers=1) or N worker processes on one storage; then the tables.

    workers=None takes `auto_workers()`. `compile` (a torch.compile mode) overrides the file's for every
    configuration; it does not change the study's identity, so a sweep can be resumed with or without it."""
    t0 = time.perf_counter()
    study = load_for(path, "sweep", compile)
    storage = storage or default_storage()
    workers = workers or auto_workers()
    n = len(study.configurations)
    ostudy = _open_grid(study, storage)
    parent = _parent_run(ostudy, study, parent_run_id)
    if workers > 1:
        codes = _spawn_workers(study.path, storage, parent, workers, compile)
        trained = -1
        if any(codes):
            raise RuntimeError(f"sweep workers exited with {codes}")
    else:
        trained = sweep_worker(study, storage, parent, progress)
    t2, t3 = sweep_tables(parent, study)
    retried = _retries(ostudy)
    _log_tables(parent, t2, t3, retried, time.perf_counter() - t0, _sweep_state(ostudy)[0], n)
    return SweepResult(parent, ostudy.study_name, trained, t2, t3, retried, time.perf_counter() - t0)


def _retries(ostudy) -> list[dict]:
    out = []
    for t in ostudy.get_trials(deepcopy=False):
        if "failed_trial" in t.system_attrs:
            out.append({"trial": t.number, "retry_of": t.system_attrs["failed_trial"],
                        "config": t.user_attrs.get("label", t.params.get("config")), "state": t.state.name})
    return out


def _log_tables(parent: str, t2: pd.DataFrame, t3: pd.DataFrame, retried: list[dict], seconds: float,
                done: int, n: int) -> None:
    with tracking.resume_run(parent) as r:
        r.log_table(t2, "table2.csv")
        r.log_table(t3, "table3.csv")
        if retried:
            r.log_table(pd.DataFrame(retried), "retried_trials.csv")
        r.log_metrics({"sweep/configurations_done": float(done), "sweep/configurations": float(n),
                       "sweep/retried_trials": float(len(retried)), "sweep/last_pass_seconds": seconds})


def plan_sweep(path: str | Path, workers: list[int], compile: str | None = None
               ) -> tuple[pd.DataFrame, dict[int, float]]:
    """Per-configuration estimates (H200 seconds; `schedule`) and the estimated wall time per worker count."""
    from .schedule import estimate, makespan

    study = load_for(path, "sweep", compile)
    est = [estimate(c) for c in study.configurations]
    table = pd.DataFrame({"configuration": study.labels, "compile_s": [e.compile_s for e in est],
                          "train_s": [e.gpu_s for e in est], "other_s": [e.overhead_s for e in est],
                          "total_s": [e.total_s for e in est]})
    return table, {w: makespan(est, w) for w in workers}


# ------------------------------------------------------------------------------------------------ tables

TABLE2 = ("accuracy", "precision", "recall", "specificity", "f1", "auc")


def _children(parent: str, experiment: str) -> list:
    runs = tracking.find_runs(experiment, parent_run_id=parent)
    return [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get("sweep_config")]


def sweep_tables(parent: str, study: Study) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table II (overall) and Table III (per sex) from the finished children, ranked on validation."""
    rows2, rows3 = [], []
    metric = study.objective_metric
    latest: dict[str, Any] = {}
    for r in sorted(_children(parent, study.experiment), key=lambda r: r.info.start_time):
        latest[r.data.tags["sweep_config"]] = r  # a retried configuration counts once: its last finished run
    for label, r in latest.items():
        m, t = r.data.metrics, r.data.tags
        row = {"configuration": label, "model": t.get("model"), "type": t.get("model_type"),
               "freeze": t.get("freeze"), f"rank_by ({metric})": m.get(metric, math.nan)}
        for k in TABLE2:
            row[f"test/{k}"] = m.get(f"test/{k}", math.nan)
            row[f"test/{k}/ci_low"] = m.get(f"test/{k}/ci_low", math.nan)
            row[f"test/{k}/ci_high"] = m.get(f"test/{k}/ci_high", math.nan)
        row["test_argmax/f1"] = m.get("test_argmax/f1", math.nan)
        row["run_id"] = r.info.run_id
        rows2.append(row)
        for group in ("female", "male"):
            g = {"configuration": label, "model": t.get("model"), "group": group,
                 f"rank_by ({metric})": m.get(metric, math.nan)}
            for k in TABLE2:
                v = m.get(f"test/{k}/{group}", math.nan)
                g[f"test/{k}"] = "not estimable" if t.get(f"not_estimable/test/{k}/{group}") else v
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
    """The tables of a sweep from the tracking store, at any time (also while it runs)."""
    study = load_for(path, "sweep")
    optuna = _optuna()
    try:
        ostudy = optuna.load_study(study_name=_study_name(study), storage=_storage(storage or default_storage()))
    except KeyError:
        return None, pd.DataFrame(), pd.DataFrame()
    parent = ostudy.user_attrs.get("mlflow_parent_run")
    if not parent:
        return None, pd.DataFrame(), pd.DataFrame()
    t2, t3 = sweep_tables(parent, study)
    return parent, t2, t3


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
    from .experiment import run_single

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
            tracking.client().set_tag(summary.run_id, "pruned", summary.stopped)
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


def run_tune(path: str | Path, *, storage: str | None = None, n_trials: int | None = None, progress: bool = True,
             parent_run_id: str | None = None, compile: str | None = None) -> TuneResult:
    optuna = _optuna()
    study = load_for(path, "tune", compile)
    ostudy = optuna.create_study(study_name=_study_name(study), storage=_storage(storage or default_storage()),
                                 sampler=_sampler(study), pruner=_pruner(study), direction=study.direction,
                                 load_if_exists=True)
    parent = _parent_run(ostudy, study, parent_run_id)
    memo = _CohortMemo()
    for t in _fail_stale(ostudy):
        _end_orphan(t)
    ostudy.optimize(_tune_objective(study, parent, memo, progress), n_trials=n_trials or study.n_trials, catch=())
    return _finish_tune(ostudy, study, parent)


def _finish_tune(ostudy, study: Study, parent: str) -> TuneResult:
    optuna = _optuna()
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
