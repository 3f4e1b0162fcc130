"""The grid on Optuna's own queue. Opening a sweep (under the storage's lock: any number of launchers may open it at
once) creates or loads the study, enqueues every configuration once (its label as user attribute `label` and
parameter `configuration`, beside every option that varies across the grid) and creates the parent run once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cushing.config import EXECUTION_FIELDS, TrainConfig
from cushing.tracking.stores import sqlalchemy_url, store_lock
from cushing.workflows.studies import Study
from cushing.workflows.sweeps.storage import _close_storage, _name_metric, _optuna, _parent_run, _storage, \
    _study_name

__all__ = ["grid_parameters", "GRID_PARAM"]

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
