"""The open grid and where each configuration stands: the Optuna study, its storage, the claims table and the
parent run; every configuration's attempts (done, training, failed for good, or the next attempt to claim); a
claimed attempt's trial, created with the configuration's real parameters, and the check that nobody took the
configuration over while it started."""
from __future__ import annotations

import dataclasses
import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

from cushing.config import EXECUTION_FIELDS, TrainConfig
from cushing.workflows.studies import Study
from cushing.workflows.sweeps.claims import GridClaims
from cushing.workflows.sweeps.parent import _parent_run
from cushing.workflows.sweeps.storage import MAX_RETRY, _beat, _close_storage, _name_metric, _optuna, _storage, \
    _study_name

__all__ = ["grid_parameters"]


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
