"""A run's life, by id: opened (the run `mlflow run` made for this process, taken once; a run offered to a block; a
run continued by id; or a new (child) run), beating while open, ended FINISHED, FAILED (with the reason as the tag
`cushing.error`) or KILLED on a stop. No run is ever MLflow's active run and no environment variable is written:
every call names its run, so runs nest and end exactly as the code says, whatever thread or order."""
from __future__ import annotations

import contextlib
import contextvars
import os
import re
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from cushing.config import ConfigError
from cushing.tracking.connection import client, configure
from cushing.tracking.logger import RunLogger
from cushing.tracking.queries import experiment_id, experiment_of_run

__all__ = ["env_run_id", "launcher_run", "start_run", "resume_run", "log_into", "offer_run", "ERROR_TAG",
           "resolve_experiment", "note_refusal"]

ERROR_TAG = "cushing.error"  # why a run ended FAILED: the first line of the error, photo file names left out
_taken: set[str] = set()  # launcher runs already taken by a run of this process
_offered: contextvars.ContextVar[str | None] = contextvars.ContextVar("cushing_offered_run", default=None)


def env_run_id() -> str | None:
    """The run `mlflow run` created for this process (MLFLOW_RUN_ID, read only), if any."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def launcher_run() -> str | None:
    """The run the next `start_run` of this block takes: one offered to it (`offer_run`), else `mlflow run`'s until
    a run of this process has taken it."""
    env = env_run_id()
    return _offered.get() or (env if env not in _taken else None)


@contextmanager
def offer_run(run_id: str) -> Iterator[None]:
    """For the block, the first run opened with `use_env_run` logs into `run_id` (a pipeline's step run), as a run
    `mlflow run` created would be taken (MLflow's multistep convention, in one process)."""
    token = _offered.set(run_id)
    try:
        yield
    finally:
        _offered.reset(token)


def resolve_experiment(given: str | None, what: str = "experiment") -> str:
    """The experiment a command logs into. Under `mlflow run`, the one its run is in: `given` (`what` names where it
    came from) must agree or is refused, so that the launcher's run and the runs nested under it share one
    experiment. Otherwise `given`, else MLFLOW_EXPERIMENT_NAME, else `cushing`."""
    env = env_run_id()
    if env is None:
        return given or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "cushing"
    actual = experiment_of_run(env)
    if given and given != actual:
        raise ConfigError(f"{what} {given!r} is not the experiment `mlflow run` made this run in ({actual!r}): name "
                          f"the experiment once, with `mlflow run --experiment-name {given}`")
    return actual


def _take(experiment: str, run_name: str, tags: Mapping[str, Any]) -> str | None:
    run_id = launcher_run()
    if run_id is None:
        return None
    if run_id == env_run_id():  # refuses an experiment other than the one `mlflow run` chose, and marks it
        experiment_id(resolve_experiment(experiment))
    if _offered.get() == run_id:
        _offered.set(None)
    _taken.add(run_id)
    RunLogger(run_id).set_tags({**tags, "mlflow.runName": run_name})
    return run_id


def _new_run(experiment: str, run_name: str, tags: Mapping[str, Any], parent_run_id: str | None) -> str:
    from mlflow.tracking.context.registry import resolve_tags  # the source, user and git tags mlflow.start_run adds

    tags = {**{k: str(v) for k, v in tags.items()}, "mlflow.runName": run_name,
            **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    return client().create_run(experiment_id(experiment), run_name=run_name, tags=resolve_tags(tags)).info.run_id


@contextmanager
def start_run(*, experiment: str, run_name: str, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None, use_env_run: bool = True,
              run_id: str | None = None) -> Iterator[RunLogger]:
    """A run in `experiment` ("": `resolve_experiment`): `run_id` (continued), else the launcher's run
    (`launcher_run`, when `use_env_run` and no parent is given), else a new (child) run. It beats while open
    (`cushing.heartbeat`) and ends FINISHED; FAILED when the body raises (the reason in the tag `cushing.error`);
    KILLED on a stop (the interrupt carries the innermost run id as `cushing_run`, for the one-line message)."""
    configure()
    experiment = experiment or resolve_experiment(None)  # "" (an MLproject default): the launcher's, or the default
    tags = dict(tags or {})
    if run_id:
        client().update_run(run_id, status="RUNNING")  # a stopped run continued (resume)
    else:
        taken = _take(experiment, run_name, tags) if use_env_run and parent_run_id is None else None
        run_id = taken or _new_run(experiment, run_name, tags, parent_run_id)
    logger = RunLogger(run_id)
    status = "FINISHED"
    try:
        logger.start_heartbeat()
        yield logger
    except KeyboardInterrupt as e:
        status = "KILLED"
        if not getattr(e, "cushing_run", None):
            e.cushing_run = run_id
        raise
    except BaseException as e:
        status = "FAILED"
        _note_error(run_id, e)
        raise
    finally:
        _end(logger, status)


def note_refusal(e: BaseException) -> None:
    """A command refused before it took `mlflow run`'s run (which MLflow then ends FAILED): that run says why."""
    run_id = env_run_id()
    if run_id and run_id not in _taken:
        _note_error(run_id, e)


def _note_error(run_id: str, e: BaseException) -> None:
    line = (f"{type(e).__name__}: {e}".splitlines() or [""])[0].rstrip(" :")
    with contextlib.suppress(Exception):  # the store itself may be what failed: the status still says it
        RunLogger(run_id).set_tags({ERROR_TAG: re.sub(r"[^\s'\"]+\.(jpe?g|png|bmp|tiff?|webp|heic)\b", "<photo>", line,
                                           flags=re.I)[:1000]})


def _end(logger: RunLogger, status: str) -> None:
    try:
        logger.close()
    except Exception:
        if status == "FINISHED":
            client().set_terminated(logger.run_id, "FAILED")
            raise
    client().set_terminated(logger.run_id, status)


@contextmanager
def resume_run(run_id: str) -> Iterator[RunLogger]:
    """Log more into an existing run (CAMs computed later, a sweep's tables into its parent). Its status stays the one
    it had: a FAILED or KILLED run is not turned FINISHED (and promotable) by it, and a run another process holds open
    stays RUNNING."""
    configure()
    logger = RunLogger(run_id)
    try:
        yield logger
    finally:
        logger.close()


@contextmanager
def log_into(parent_run_id: str | None, *, experiment: str, run_name: str,
             tags: Mapping[str, Any] | None = None) -> Iterator[RunLogger]:
    """Where a step that works on other runs (a dashboard, a comparison) logs: the launcher's run, nested under
    `parent_run_id`; else `parent_run_id` itself; else a new run named `run_name`."""
    if parent_run_id and not launcher_run():
        with resume_run(parent_run_id) as r:
            yield r
        return
    with start_run(experiment=experiment, run_name=run_name, tags=tags) as r:
        r.nest_under(parent_run_id)
        yield r
