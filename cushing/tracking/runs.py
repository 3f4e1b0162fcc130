"""A run's life: opened (the one `mlflow run` created, taken once per process; a run continued by id; or a new
(child) run), beating while open, ended FINISHED, FAILED, or KILLED on Ctrl-C and SIGTERM; runs resumed later
keep the status they had."""
from __future__ import annotations

import contextlib
import os
import re
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from cushing.tracking.connection import client, configure, holding
from cushing.tracking.liveness import _Heartbeat
from cushing.tracking.logger import RunLogger
from cushing.tracking.queries import experiment_id, mark_experiment

__all__ = ["env_run_id", "start_run", "resume_run", "log_into", "held_run", "offer_run", "ERROR_TAG"]

ERROR_TAG = "cushing.error"  # why a run ended FAILED: the first line of the error, photo file names left out


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
        actual = mark_experiment(run.info.experiment_id)  # one `mlflow run` made gets marked too
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
              run_id: str | None = None, detached: bool = False) -> Iterator[RunLogger]:
    """A run in `experiment`: the one `mlflow run` created (MLFLOW_RUN_ID; taken once per process), `run_id`
    (continued), or a new (child) run. While it is open it beats (`RunLogger.start_heartbeat`).

    The run ends FAILED when the body raises, KILLED on Ctrl-C or SIGTERM (the interrupt carries the run id as
    `cushing_run` for the one-line message), else FINISHED.

    `detached=True`: always a new run, created by id and never MLflow's active run, which the body may hand over
    (`RunLogger.hand_over`) to be finished and ended on another thread (a sweep worker's finisher).
    """
    configure()
    if detached:
        with _detached_lifecycle(experiment, run_name, tags, parent_run_id) as logger:
            yield logger
        return
    with contextlib.ExitStack() as keep:
        env = env_run_id()
        if not (env and use_env_run and parent_run_id is None and not run_id):
            keep.enter_context(_without_env_run())  # not `mlflow run`'s run: leave MLFLOW_RUN_ID for a later one
        with _run_lifecycle(experiment, run_name, tags, parent_run_id, use_env_run, run_id) as logger:
            yield logger


class _Outcome:
    """How the body of a run's block ended: FINISHED; KILLED on Ctrl-C or SIGTERM (the interrupt names the
    innermost run as `cushing_run`, for the one-line message of cli/stops.py); FAILED when it raised."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.status = "FINISHED"

    @contextmanager
    def watch(self) -> Iterator[None]:
        try:
            yield
        except KeyboardInterrupt as e:
            self.status = "KILLED"
            if not getattr(e, "cushing_run", None):
                e.cushing_run = self.run_id
            raise
        except BaseException as e:
            self.status = "FAILED"
            with contextlib.suppress(Exception):  # best effort: the failure itself must reach the user
                line = (f"{type(e).__name__}: {e}".splitlines() or [""])[0].rstrip(" :")
                client().set_tag(self.run_id, ERROR_TAG, re.sub(r"[^\s'\"]+\.(jpe?g|png|bmp|tiff?|webp|heic)\b",
                                                                 "<photo>", line, flags=re.I)[:1000])
            raise


@contextmanager
def _run_lifecycle(experiment: str, run_name: str, tags: Mapping[str, Any] | None, parent_run_id: str | None,
                   use_env_run: bool, run_id: str | None) -> Iterator[RunLogger]:
    import mlflow

    with holding():  # a stop here is raised once the run exists (cushing.interrupts)
        run = _open_run(experiment, run_name, parent_run_id, use_env_run, run_id)
    logger = RunLogger(run.info.run_id)
    if tags:
        logger.set_tags(tags)
    outcome = _Outcome(logger.run_id)
    try:
        with outcome.watch():
            logger.start_heartbeat()
            yield logger
    finally:
        try:
            logger.close()
        except Exception:
            if outcome.status == "FINISHED":
                outcome.status = "FAILED"
                raise
            # the body's own exception is already propagating; do not mask it
        finally:
            mlflow.end_run(status=outcome.status)


@contextmanager
def _detached_lifecycle(experiment: str, run_name: str, tags: Mapping[str, Any] | None,
                        parent_run_id: str | None) -> Iterator[RunLogger]:
    logger = RunLogger(_new_run_id(experiment, run_name, tags or {}, parent_run_id))
    outcome = _Outcome(logger.run_id)
    try:
        with outcome.watch():
            logger.start_heartbeat()
            yield logger
    finally:
        if outcome.status != "FINISHED" or not logger.handed_over:
            try:
                logger.end(outcome.status)
            except Exception:
                if outcome.status == "FINISHED":
                    raise


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


def _new_run_id(experiment: str, run_name: str, tags: Mapping[str, Any], parent_run_id: str | None) -> str:
    from mlflow.tracking.context.registry import resolve_tags

    tags = {**{k: str(v) for k, v in tags.items()}, "mlflow.runName": run_name,
            **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    return client().create_run(experiment_id(experiment), run_name=run_name, tags=resolve_tags(tags)).info.run_id


@contextmanager
def held_run(*, experiment: str, run_name: str, tags: Mapping[str, Any] | None = None,
             parent_run_id: str | None = None, use_env_run: bool = True) -> Iterator[str]:
    """A run this process holds by id and never makes MLflow's active run, so that what runs inside it in this
    process opens (or takes, `offer_run`) runs of its own freely: a pipeline and its steps. The run `mlflow run`
    created (taken once per process) when there is one and no parent is given; else a new (child) run. It beats
    while held and ends FINISHED, FAILED when the body raises, KILLED on Ctrl-C and SIGTERM (whatever the body's
    own runs did with it)."""
    configure()
    env = env_run_id() if use_env_run and parent_run_id is None else None
    if env:
        os.environ.pop("MLFLOW_RUN_ID", None)  # taken: later runs of this process are new ones
        run_id = env
        for k, v in {**(tags or {}), "mlflow.runName": run_name}.items():
            client().set_tag(run_id, k, str(v))
    else:
        run_id = _new_run_id(experiment, run_name, tags or {}, parent_run_id)
    beat = _Heartbeat(run_id)
    beat.start()
    outcome = _Outcome(run_id)
    try:
        with outcome.watch():
            yield run_id
    finally:
        beat.stop()
        client().set_terminated(run_id, outcome.status)


@contextmanager
def offer_run(run_id: str) -> Iterator[None]:
    """For the block, `run_id` is the run `mlflow run` would have created (MLFLOW_RUN_ID): the first run the block
    starts logs into it (MLflow's multistep convention, in one process). Withdrawn afterwards, taken or not."""
    saved = os.environ.get("MLFLOW_RUN_ID")
    os.environ["MLFLOW_RUN_ID"] = run_id
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_RUN_ID", None)
        else:
            os.environ["MLFLOW_RUN_ID"] = saved
