"""The pipeline run: one run (the run `mlflow run` created, or a new one) with each step a child run of it; a step
whose key matches a finished step run is reused (linked by tags on the pipeline run) instead of run again; a step
that fails ends the pipeline FAILED naming itself, its run and the command that resumes; a stop ends it KILLED.

Each step runs in this process: its run is created here as a child of the pipeline run and offered to the step's
own code (`tracking.offer_run`) as MLflow's multistep convention offers the run `mlflow run` created, so the step
logs exactly as its `cushing` command does. Between steps, a stop ends the pipeline KILLED. One pipeline at a time
works in a pipeline folder (a file lock).

The plan shown before anything runs: which steps finished earlier with the same inputs (reused), which will run,
and the sweep's estimated time on a GPU (the sweep planner's figures). Planning only reads; it writes nothing."""
from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from cushing import stops, tracking
from cushing.data.manifest import sha256_file
from cushing.private import private_dir
from cushing.release.registry import model_card, registry_status
from cushing.workflows.pipeline.inputs import PipelineSpec, code_version, manifest_digest, run_digests, step_key, \
    validate_inputs
from cushing.workflows.pipeline.steps import Context, Step, steps_for
from cushing.workflows.plan import estimate, makespan
from cushing.workflows.studies import Study, load_study

__all__ = ["StepFailed", "StepRecord", "PipelineResult", "plan_pipeline", "run_pipeline", "pipeline_experiment",
           "SERVE_PORT", "PlannedStep", "Plan", "plan_steps", "reusable", "format_plan", "KEY_TAG", "STEP_TAG",
           "OUTPUTS_TAG"]

SERVE_PORT = 5001  # the port the printed serve command uses (the tutorial's)
STEP_TAG = "cushing.pipeline.step"
KEY_TAG = "cushing.pipeline.key"  # set when the step finished: what a later pipeline looks its work up by
OUTPUTS_TAG = "cushing.pipeline.outputs"
GPU_FIGURES = "h200"  # the only GPU the sweep planner has figures for (workflows/plan.py)


@dataclass
class PlannedStep:
    name: str
    status: str  # reuse | run | after (its inputs come from a step that runs first)
    run_id: str | None = None  # the finished run it reuses
    note: str = ""


@dataclass
class Plan:
    header: str
    steps: list[PlannedStep]
    estimate: str


def reusable(step: Step, ctx: Context, key: str) -> tuple[str, dict[str, Any]] | None:
    """A FINISHED run of this step with the same key whose outputs are still intact: (run id, outputs)."""
    for r in tracking.find_finished(ctx.experiment, {KEY_TAG: key, STEP_TAG: step.name}):
        outputs = json.loads(r.tags.get(OUTPUTS_TAG, "null") or "null")
        if outputs is not None and step.still_there(outputs):
            return r.run_id, outputs
    return None


def _to_train(study: Study, experiment: str) -> list[int]:
    """Indexes of the configurations with no finished training run yet (a resumed sweep trains only these)."""
    return [i for i, digest in enumerate(run_digests(study))
            if not tracking.find_finished(experiment, {"config_digest": digest, "sweep": study.name})]


def plan_steps(ctx: Context) -> tuple[list[PlannedStep], list[int] | None]:
    """Each step's status, walking the steps as the pipeline will (a reused step's outputs feed the next key);
    and the sweep's configurations still to train (None: all, as far as can be known before faces runs)."""
    planned, to_train = [], None
    for step in steps_for(ctx.spec):
        inputs = step.inputs(ctx)
        if inputs is None:
            waits = next(n for n in step.needs if n not in ctx.outputs)
            planned.append(PlannedStep(step.name, "after", note=f"or reuse, if what {waits} hands on is unchanged"))
            continue
        if found := reusable(step, ctx, step_key(step.name, inputs)):
            ctx.outputs[step.name] = found[1]
            to_train = [] if step.name == "sweep" else to_train
            planned.append(PlannedStep(step.name, "reuse", found[0], step.describe(found[1])))
            continue
        note = ""
        if step.name == "sweep":
            to_train = _to_train(ctx.study(), ctx.experiment)
            n = len(ctx.study().labels)
            note = f"{len(to_train)} of {n} configurations to train" + (
                f" ({n - len(to_train)} finished earlier)" if len(to_train) < n else "")
        planned.append(PlannedStep(step.name, "run", note=note))
    return planned, to_train


def gpu_estimate(study: Study, to_train: list[int] | None, gpu: str | None, workers: int | None) -> str:
    """The sweep's estimated wall time where a GPU is named or CUDA is present; else say there is none."""
    import torch

    if to_train == []:
        return "estimated time: nothing to train (the sweep is reused)"
    if gpu:
        device = f"one NVIDIA {gpu.upper()}"
    elif torch.cuda.is_available():
        device = f"this {torch.cuda.get_device_name(0)} (with the H200's figures; other GPUs scale)"
    else:
        return f"estimated time: no estimate on CPU (`--gpu {GPU_FIGURES}` shows the sweep's on one H200)"
    idx = range(len(study.configurations)) if to_train is None else to_train
    est = [estimate(study.configurations[i]) for i in idx]
    w = workers or 2  # two trainings share one GPU at 1.5x the throughput of one (the sweep's auto)
    return (f"estimated time: sweep {makespan(est, w) / 60:.1f} min on {device} ({len(est)} configuration"
            f"{'s' if len(est) != 1 else ''} to train, {w} workers; the sweep planner's figures, as `cushing sweep "
            "--plan`); the other steps run on the CPU besides (not estimated)")


def format_plan(plan: Plan) -> str:
    lines = [plan.header]
    for s in plan.steps:
        text = {"reuse": f"reuse run {s.run_id}: {s.note}", "after": f"run ({s.note})"}.get(
            s.status, "run" + (f": {s.note}" if s.note else ""))
        lines.append(f"  {s.name:<10} {text}")
    return "\n".join([*lines, plan.estimate])


class StepFailed(RuntimeError):
    """A step failed: the pipeline stopped there (nothing after it ran) and ended FAILED."""

    def __init__(self, step: str, run_id: str | None, cause: str, resume: str):
        self.step, self.run_id, self.cause, self.resume = step, run_id, cause, resume
        super().__init__(f"step {step} failed{f' (run {run_id})' if run_id else ''}: {cause}\n"
                         f"  nothing after it ran; fix the cause, then resume (finished steps are reused):\n"
                         f"  {resume}")


@dataclass
class StepRecord:
    name: str
    run_id: str
    reused: bool
    outputs: dict[str, Any]
    seconds: float = 0.0


@dataclass
class PipelineResult:
    run_id: str
    experiment: str
    steps: list[StepRecord]
    champion: dict[str, str] = field(default_factory=dict)  # version, run, model of the registry's champion now
    model_card: Path | None = None
    dashboard: Path | None = None
    serve: str = ""
    seconds: float = 0.0
    ui: str = ""  # the experiment's runs table in the MLflow UI


def pipeline_experiment(spec: PipelineSpec) -> str:
    """The experiment of `mlflow run`'s run (--experiment must agree), else --experiment, MLFLOW_EXPERIMENT_NAME,
    the study file's, else `cushing`."""
    if spec.experiment or tracking.env_run_id() or os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return tracking.resolve_experiment(spec.experiment, "--experiment")
    return tracking.resolve_experiment(load_study(spec.study).experiment)


def _shown_uri() -> str | None:
    """The tracking URI for a command line, unless it carries a password (then the reader's own setting)."""
    uri = tracking.tracking_uri()
    return None if "@" in uri.split("/")[2 if "://" in uri else 0] else uri


def resume_command(spec: PipelineSpec, experiment: str) -> str:
    return spec.command(experiment, _shown_uri())


def plan_pipeline(spec: PipelineSpec, *, experiment: str | None = None, code: str | None = None) -> Plan:
    """What would run and what would be reused, and the estimated time; reads only."""
    experiment = experiment or pipeline_experiment(spec)
    ctx = Context(spec, experiment, code or code_version())
    planned, to_train = plan_steps(ctx)
    header = (f"pipeline {load_study(spec.study).name}: {spec.photos} -> {spec.out}\n"
              f"  runs in experiment {experiment!r} of {tracking.tracking_uri()}; steps that finished earlier with "
              "the same inputs are reused")
    return Plan(header, planned, gpu_estimate(ctx.study(), to_train, spec.gpu, spec.workers))


@contextmanager
def _folder_lock(out: Path, say: Callable[[str], None]) -> Iterator[None]:
    """One pipeline at a time in a pipeline folder: a second waits, then finds the first one's steps finished."""
    private_dir(out)  # it holds the face crops and the audit
    with open(out / ".pipeline.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another pipeline is working in {out}: waiting for it to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _keep_under(run_id: str, pipeline_run: str) -> None:
    """A step's own code may nest its run elsewhere (promote and the dashboard under the sweep they read, a later
    sweep pass under the study's parent): in a pipeline it stays a child of the pipeline run."""
    parent = tracking.get_run(run_id).parent_run_id
    if parent != pipeline_run:
        tracking.set_tags(run_id, {"mlflow.parentRunId": pipeline_run, **({"related_run": parent} if parent else {})})


def _run_step(step: Step, ctx: Context, key: str, pipeline_run: str) -> StepRecord:
    started, t0 = None, time.perf_counter()
    tags = {STEP_TAG: step.name, "cushing.pipeline.run": pipeline_run, "cushing.pipeline.code": ctx.code,
            "task": f"pipeline-{step.name}"}
    try:
        with tracking.start_run(experiment=ctx.experiment, run_name=step.name, tags=tags,
                                parent_run_id=pipeline_run, use_env_run=False) as run:
            run_id = started = run.run_id
            try:
                with tracking.offer_run(run_id):
                    outputs = step.run(ctx)
            finally:
                _keep_under(run_id, pipeline_run)
            tracking.set_tags(run_id, {OUTPUTS_TAG: json.dumps(outputs, default=str), KEY_TAG: key})
    except KeyboardInterrupt as e:
        e.pipeline_stop = (step.name, started, resume_command(ctx.spec, ctx.experiment))  # type: ignore[attr-defined]
        raise
    except Exception as e:
        raise StepFailed(step.name, started, f"{type(e).__name__}: {e}",
                         resume_command(ctx.spec, ctx.experiment)) from e
    return StepRecord(step.name, run_id, False, outputs, time.perf_counter() - t0)


def _step(step: Step, ctx: Context, pipeline_run: str, say: Callable[[str], None]) -> StepRecord:
    """Reuse the step's finished run when its key matches (and its outputs are intact); else run it."""
    key = step_key(step.name, step.inputs(ctx) or {})
    if found := reusable(step, ctx, key):
        record = StepRecord(step.name, found[0], True, found[1])
        say(f"[pipeline] {step.name}: reused run {found[0]} (same inputs, finished earlier)")
    else:
        say(f"[pipeline] {step.name}: running")
        record = _run_step(step, ctx, key, pipeline_run)
        say(f"[pipeline] {step.name}: done in {record.seconds:.0f} s, run {record.run_id} "
            f"({step.describe(record.outputs)})")
    ctx.outputs[step.name] = record.outputs
    tracking.set_tags(pipeline_run, {f"cushing.pipeline.{step.name}.run": record.run_id,
                                     f"cushing.pipeline.{step.name}.reused": str(record.reused).lower()})
    return record


def _say(text: str) -> None:
    print(text, flush=True)  # in order with the steps' own lines, also through a pipe


def run_pipeline(spec: PipelineSpec, *, say: Callable[[str], None] = _say) -> PipelineResult:
    """Plan (shown first), then every step in order, under one pipeline run; the champion and its card at the
    end. A failed step raises `StepFailed`; a stop (Ctrl-C, SIGTERM) ends the runs KILLED and is re-raised."""
    t0 = time.perf_counter()
    experiment, code = pipeline_experiment(spec), code_version()
    ctx = Context(spec, experiment, code)
    validate_inputs(spec, ctx.study())  # before any run, folder or lock: a refused input leaves nothing behind
    with _folder_lock(spec.out, say):
        say(format_plan(plan_pipeline(spec, experiment=experiment, code=code)))
        name = f"pipeline-{load_study(spec.study).name}"
        tags = {"task": "pipeline", "cushing.pipeline.code": code,
                "cushing.pipeline.command": resume_command(spec, experiment)[:4900]}
        with tracking.start_run(experiment=experiment, run_name=name, tags=tags) as run:
            run_id = run.run_id
            say(f"[pipeline] run {run_id} in experiment {experiment!r}")
            run.log_params(_inputs(spec))
            exp_id, records = tracking.experiment_id(experiment), []
            with stops.cooperative():
                for step in steps_for(spec):
                    stops.check()
                    records.append(_step(step, ctx, run_id, say))
                    tracking.set_tags(run_id, {"mlflow.note.content": _describe(exp_id, records)})
            result = _finish(ctx, records, run_id)
    result.seconds = time.perf_counter() - t0
    return result


def _inputs(spec: PipelineSpec) -> dict[str, str]:
    """The pipeline run's params: its inputs, files by content (under `mlflow run`, a -P value given otherwise,
    e.g. a relative path, stays and this one is `resolved/<name>`)."""
    return {"photos_digest": manifest_digest(spec.photos)[:16], "study": str(spec.study),
            "study_digest": sha256_file(spec.study)[:16], "set": " ".join(f"{k}={v}" for k, v in spec.overrides),
            "model": spec.model or "", "external_digest": manifest_digest(spec.external)[:16] if spec.external else "",
            "skip_bad_photos": str(spec.skip_bad_photos).lower()}


def _describe(experiment_id: str, records: list[StepRecord]) -> str:
    """The pipeline run's description (`mlflow.note.content`, Markdown on its page in the MLflow UI): each step's
    run, linked (in the UI's model-training mode, see `runs_link`), ran here or reused (a reused step's run sits
    under the pipeline that ran it)."""
    rows = [f"| {r.name} | [{r.run_id[:8]}](#/experiments/{experiment_id}/runs/{r.run_id}?workflowType="
            f"machine_learning) | " + ("reused (finished earlier with the same inputs) |" if r.reused else
                                       "ran here |") for r in records]
    return "\n".join([f"{sum(r.reused for r in records)} of {len(records)} steps reused.", "",
                      "| step | run | |", "|---|---|---|", *rows])


def _finish(ctx: Context, records: list[StepRecord], run_id: str) -> PipelineResult:
    """The registry's champion now, its card in the pipeline folder, pipeline.json (also on the pipeline run)."""
    name = ctx.outputs["promote"]["registered_model"]
    champion = next((s for s in registry_status(name) if s["alias"] == "champion"), {})
    card = ctx.spec.out / "model_card.md" if champion else None
    if card:
        card.write_text(model_card(name, champion["version"]))
    uri = _shown_uri()
    serve = ((f"MLFLOW_TRACKING_URI={uri} " if uri else "")
             + f"mlflow models serve -m models:/{name}@champion --env-manager local -p {SERVE_PORT}")
    ui = tracking.runs_link(ctx.experiment)
    if uri and not uri.startswith("http"):  # the embedded store: no UI until one runs on it
        ui += f" (once `mlflow ui --backend-store-uri {uri} --port 5000` runs)"
    summary = {"pipeline_run": run_id, "experiment": ctx.experiment, "champion": champion,
               "steps": [{"step": r.name, "run": r.run_id, "reused": r.reused, "outputs": r.outputs}
                         for r in records], "serve": serve, "mlflow_ui": ui}
    (ctx.spec.out / "pipeline.json").write_text(json.dumps(summary, indent=1, default=str))
    _log_summary(run_id, summary)
    tracking.set_tags(run_id, {"champion_version": champion.get("version", ""), "registered_model": name})
    return PipelineResult(run_id, ctx.experiment, records, champion, card, Path(ctx.outputs["dashboard"]["path"]),
                          serve, ui=ui)


def _log_summary(run_id: str, summary: dict[str, Any]) -> None:
    with tracking.artifact_dir() as d:
        (d / "pipeline.json").write_text(json.dumps(summary, indent=1, default=str))
        tracking.log_artifacts_to(run_id, d)
