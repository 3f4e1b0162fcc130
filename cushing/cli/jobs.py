"""Jobs on models already trained: `cushing explain` (Grad-CAM), `cushing evaluate` (external validation) and
`cushing compare` (paired tests between runs)."""
from __future__ import annotations

import argparse

from cushing.cli.options import Command, _opt_float, _scope, _scope_options, _yes

COMMANDS: dict[str, Command] = {}


def _explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-id", default=None, help="a training run: CAMs are logged into it")
    p.add_argument("--model", default=None, help="a model URI (models:/cushing@champion): CAMs go to a new run")
    p.add_argument("--manifest", default=None, help="images to explain (default: the run's own data, test split)")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                   help="which photos of the run's own data (of a manifest's split column)")
    p.add_argument("--allow-phi-artifacts", type=_yes, default=False, metavar="BOOL",
                   help="true: also per-image overlays (hashed names)")
    p.add_argument("--experiment", default="cushing")
    p.add_argument("--device", default="auto")


def _explain(ns: argparse.Namespace) -> int:
    from cushing.workflows.jobs import run_explain

    run_id, rep = run_explain(run_id=ns.run_id, model_uri=ns.model, manifest=ns.manifest, split=ns.split,
                              allow_phi=ns.allow_phi_artifacts, experiment=ns.experiment, device=ns.device)
    spearman = rep.metrics.get("cam/randomization_spearman", float("nan"))
    print(f"Grad-CAM for {int(rep.metrics.get('cam/images', 0))} images logged to run {run_id}: "
          f"cam/mean_*.png, cam_regions.csv; randomisation Spearman {spearman:.3f}")
    return 0


COMMANDS["explain"] = ("Grad-CAM aggregates for an existing run or registered model", _explain_args, _explain)


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="models:/cushing@champion, models:/cushing/3, runs:/ID/model")
    p.add_argument("--manifest", required=True, help="the external cohort (same manifest contract)")
    p.add_argument("--experiment", default="cushing")
    p.add_argument("--min-positives", type=int, default=5)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--prevalence", type=_opt_float, default=None, help="screening prevalence for PPV/NPV")
    p.add_argument("--seed", type=int, default=0)


def _evaluate(ns: argparse.Namespace) -> int:
    from cushing.workflows.jobs import run_evaluate

    res = run_evaluate(model_uri=ns.model, manifest=ns.manifest, experiment=ns.experiment,
                       min_positives=ns.min_positives, bootstrap=ns.bootstrap, seed=ns.seed, prevalence=ns.prevalence)
    print(f"external validation run {res.run_id}")
    n, why = sum(res.excluded.values()), ", ".join(f"{k} {v}" for k, v in res.excluded.items())
    print(f"  {n} of {n + len(res.predictions)} photos excluded, not scored ({why})" if n else
          f"  all {len(res.predictions)} photos scored")
    print(res.report.per_sex.to_string(index=False, columns=[c for c in ("group", "n", "positives", "recall",
          "specificity", "f1", "auc") if c in res.report.per_sex.columns]))
    return 0


COMMANDS["evaluate"] = ("score a registered model on a new cohort (external validation)", _evaluate_args, _evaluate)


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_ids", nargs="*", help="runs evaluated on the same test subjects")
    _scope_options(p, "compare")
    p.add_argument("--log", action="store_true", help="log comparison.csv (to the parent run, or a new run)")


def _compare(ns: argparse.Namespace) -> int:
    from cushing.workflows.jobs import compare_runs
    from cushing.tracking import find_runs

    ids = list(ns.run_ids)
    scope = _scope(ns)
    if scope.parent_run_id:
        ids += [r.run_id for r in find_runs(scope.experiment, parent_run_id=scope.parent_run_id)
                if r.status == "FINISHED" and "model_uri" in r.tags]
    res = compare_runs(ids, log_to=(scope.parent_run_id or "") if ns.log else None, experiment=scope.experiment)
    cols = ["model_a", "model_b", "n", "auc_a", "auc_b", "delong_p", "delong_p_holm", "acc_a", "acc_b",
            "mcnemar_p", "mcnemar_p_holm"]
    print(res.table[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if res.run_id:
        print(f"logged comparison.csv to run {res.run_id}")
    return 0


COMMANDS["compare"] = ("paired DeLong and McNemar tests between runs (Holm-corrected)", _compare_args, _compare)
