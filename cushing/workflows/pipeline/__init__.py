"""`cushing pipeline`: from a folder of photos to a served, carded champion in one command. Faces -> audit ->
sweep (or one model) -> promote -> dashboard -> evaluate, each step a child run of one pipeline run; a step whose
inputs (content digests, parameters, code version, upstream outputs) match a finished step run is reused, as in
MLflow's multistep example; a plan comes first.

Owns: `inputs` (the spec, digests, the study trained), `steps`, `runner` (the run, reuse and the plan). May
import every subpackage below workflows and the workflows it composes; MLflow only through `cushing.tracking` and
`cushing.release`.
"""
from __future__ import annotations

from cushing.workflows.pipeline.inputs import PipelineSpec, default_out, parse_overrides, resolve_input
from cushing.workflows.pipeline.runner import Plan, PlannedStep, PipelineResult, StepFailed, StepRecord, \
    format_plan, plan_pipeline, run_pipeline
from cushing.workflows.pipeline.steps import StepError

__all__ = ["PipelineSpec", "parse_overrides", "resolve_input", "default_out", "Plan", "PlannedStep", "format_plan",
           "PipelineResult", "StepFailed", "StepRecord", "plan_pipeline", "run_pipeline", "StepError"]
