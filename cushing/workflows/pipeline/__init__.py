"""`cushing pipeline`: from a folder of photos to a served, carded champion in one command. Faces -> audit ->
sweep (or one model) -> promote -> dashboard -> evaluate (with an external cohort), each step a child run of one
pipeline run, each step's outputs handed to the next by the pipeline; a step whose inputs (content digests, its
parameters, the code version, its upstream steps' outputs) match a finished step run is reused, as in MLflow's
multistep example; a plan (what is reused, what runs, the estimated time) comes first.

Owns: `inputs` (the spec, digests, the code version, the study the pipeline trains), `steps` (each step's key,
work and outputs), `plan` (reuse lookup, the plan and its estimate), `runner` (the pipeline run, step runs,
failure and stops). May import every subpackage below workflows and the other workflows it composes (faces,
cohort_audit, sweeps, dashboard, jobs); MLflow only through `cushing.tracking` and `cushing.release`.
"""
from __future__ import annotations

from cushing.workflows.pipeline.inputs import PipelineSpec, default_out, parse_overrides, resolve_input
from cushing.workflows.pipeline.plan import Plan, PlannedStep, format_plan
from cushing.workflows.pipeline.runner import PipelineResult, StepFailed, StepRecord, plan_pipeline, \
    run_pipeline
from cushing.workflows.pipeline.steps import StepError

__all__ = ["PipelineSpec", "parse_overrides", "resolve_input", "default_out", "Plan", "PlannedStep", "format_plan",
           "PipelineResult", "StepFailed", "StepRecord", "plan_pipeline", "run_pipeline", "StepError"]
