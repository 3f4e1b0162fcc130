"""The plan a pipeline shows before anything runs: its steps, which finished earlier with the same inputs (reused)
and which will run, and the sweep's estimated time on a GPU (the sweep planner's figures). Planning only reads:
the photos, the study file, the tracking store (when it exists); it writes nothing."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cushing import tracking
from cushing.workflows.pipeline.inputs import run_digests, step_key
from cushing.workflows.pipeline.steps import Context, Step, steps_for
from cushing.workflows.plan import estimate, makespan
from cushing.workflows.studies import Study

__all__ = ["PlannedStep", "Plan", "plan_steps", "reusable", "format_plan", "KEY_TAG", "STEP_TAG", "OUTPUTS_TAG"]

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
