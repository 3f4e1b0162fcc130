"""`cushing pipeline`: photos -> faces -> audit -> sweep (or one model) -> promote -> dashboard -> evaluate, in one
command; finished steps with the same inputs are reused, a plan comes first, `--plan` shows only the plan."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cushing.cli.options import Command, _workers, _yes

COMMANDS: dict[str, Command] = {}
GPUS = ("h200",)  # GPUs the sweep planner has figures for


def _opt(text: str) -> str | None:
    """A text option that MLproject may pass as '' (unset)."""
    return None if text in ("", "''", '""', "None") else text


def _gpu(text: str) -> str | None:
    value = _opt(text)
    if value is not None and value.lower() not in GPUS:
        raise argparse.ArgumentTypeError(f"the sweep planner has figures for {', '.join(GPUS)} only, got {text!r}")
    return value.lower() if value else None


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--photos", required=True, help="the photos' manifest CSV (image, label, sex, subject_id)")
    p.add_argument("--study", default="projects/paper.yaml",
                   help="a sweep study file: its grid, protocol and promote policy (a relative path not found in "
                        "the working directory is read in the project folder)")
    p.add_argument("--model", type=_opt, default=None,
                   help="train this one model instead of the study's grid (a one-configuration study on its base)")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="a training option for every configuration, e.g. epochs=20 (repeatable; several in one "
                        "value separated by spaces)")
    p.add_argument("--external", type=_opt, default=None,
                   help="an external cohort's manifest: the champion is evaluated on it (the last step)")
    p.add_argument("--out", type=_opt, default=None,
                   help="the pipeline folder: faces/, audit/, study.yaml, dashboard.html, model_card.md, pipeline.json "
                        "(default: pipeline/ in the working directory; under `mlflow run`, beside the embedded "
                        "tracking store)")
    p.add_argument("--experiment", type=_opt, default=None,
                   help="default: that of `mlflow run`'s run, else MLFLOW_EXPERIMENT_NAME, else the study file's")
    p.add_argument("--workers", type=_workers, default=None, metavar="N|auto",
                   help="trainings at once (default auto: 2 with a CUDA GPU, else 1)")
    p.add_argument("--gpu", type=_gpu, default=None, metavar="NAME",
                   help="estimate the sweep's time on this GPU (h200); default: when CUDA is present")
    p.add_argument("--sam-checkpoint", type=_opt, default=None, help="SAM weights for the face masks (the paper's)")
    p.add_argument("--skip-bad-photos", type=_yes, default=False, metavar="true|false",
                   help="true: leave out photos that cannot be found, read or cropped (counted on the runs and in "
                        "the model card) instead of stopping on them")
    p.add_argument("--plan", type=_yes, nargs="?", const=True, default=False, metavar="true|false",
                   help="only print the plan (steps, reused or to run, estimated time); runs and writes nothing")


def _spec(ns: argparse.Namespace):
    from cushing.workflows.pipeline import PipelineSpec, default_out, parse_overrides, resolve_input

    return PipelineSpec(photos=resolve_input(ns.photos, "the photos' manifest"),
                        study=resolve_input(ns.study, "the study file", project=True),
                        out=Path(ns.out).expanduser().resolve() if ns.out else default_out(), model=ns.model,
                        overrides=parse_overrides(ns.overrides), external=resolve_input(
                            ns.external, "the external cohort's manifest") if ns.external else None,
                        experiment=ns.experiment, workers=ns.workers, gpu=ns.gpu, sam_checkpoint=ns.sam_checkpoint,
                        skip_bad_photos=ns.skip_bad_photos)


def _print_result(res) -> None:
    ran = sum(not s.reused for s in res.steps)
    print(f"\npipeline run {res.run_id}: {len(res.steps)} steps ({ran} ran, {len(res.steps) - ran} reused) in "
          f"{res.seconds:.0f} s")
    if c := res.champion:
        print(f"champion: version {c['version']} ({c['model']}, run {c['run']}; {c['selection']})")
        print(f"model card: {res.model_card} (also the version's description in the registry)")
    print(f"dashboard: {res.dashboard}")
    print(f"runs in the MLflow UI: {res.ui}")
    if skipped := res.steps[0].outputs.get("skipped"):
        print(f"skipped photos: {skipped} (--skip-bad-photos true; per class and sex on the face-stage run and in "
              "the model card)")
    if (evaluation := next((s for s in res.steps if s.name == "evaluate"), None)) is not None:
        o = evaluation.outputs
        print(f"external evaluation: run {o['run']} ({o['model_uri']}; AUC {o['auc']:.3f}, F1 {o['f1']:.3f}, "
              f"n {o['n']:.0f}" + (f"; {o['excluded']} photos excluded, not scored: no usable face)" if
                                     o.get("excluded") else ")"))
    print(f"serve the champion:\n  {res.serve}")


def _name_plan_run(title: str) -> None:
    """Under `mlflow run -P plan=true` MLflow has already made a run: name it for what it was (a plan), not a
    random name beside the pipeline's real runs."""
    from cushing import tracking

    if run_id := tracking.env_run_id():
        tracking.set_tags(run_id, {"mlflow.runName": f"{title} (plan)", "cushing.pipeline_plan": "true"})


def _pipeline(ns: argparse.Namespace) -> int:
    from cushing.workflows.pipeline import StepFailed, format_plan, plan_pipeline, run_pipeline

    spec = _spec(ns)
    if ns.plan:
        plan = plan_pipeline(spec)
        print(format_plan(plan))
        _name_plan_run(plan.header.split(":", 1)[0])
        return 0
    try:
        res = run_pipeline(spec)
    except StepFailed as e:
        print(f"cushing pipeline: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        step, run, resume = getattr(e, "pipeline_stop", (None, None, None))
        if step:
            print(f"cushing pipeline: stopped during step {step}" + (f" (run {run} is marked KILLED)" if run else "")
                  + f"; resume (finished steps are reused, nothing is trained twice):\n  {resume}", file=sys.stderr)
        raise
    _print_result(res)
    return 0


COMMANDS["pipeline"] = ("photos -> faces -> audit -> sweep -> promote -> dashboard -> evaluate in one command; "
                        "finished steps are reused", _pipeline_args, _pipeline)
