"""The typed record the rest of the package reads a run as (`RunRecord`): nothing outside tracking/ and release/
sees an MLflow object."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RunRecord"]


@dataclass(frozen=True)
class RunRecord:
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
