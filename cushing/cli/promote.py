"""`cushing promote`: register the best run on validation and move the challenger and champion aliases."""
from __future__ import annotations

import argparse

from cushing.cli.options import Command, _opt_float, _scope, _scope_options, _yes

COMMANDS: dict[str, Command] = {}


def _promote_args(p: argparse.ArgumentParser) -> None:
    _scope_options(p, "rank")
    p.add_argument("--metric", default=None, help="validation metric to rank on (default val/f1)")
    p.add_argument("--min-value", type=_opt_float, default=None, help="gate: the metric must reach this")
    p.add_argument("--max-sex-gap", type=_opt_float, default=None, help="gate: |female - male| of the metric")
    p.add_argument("--max-subgroup-gap", type=_opt_float, default=None,
                   help="gate: best - worst subgroup of the metric, for every subgroup column other than sex")
    p.add_argument("--allow-synthetic", type=_yes, default=False, metavar="BOOL",
                   help="true: a model trained on synthetic data (the demo cohort) may become champion")


def _promote(ns: argparse.Namespace) -> int:
    from cushing.release.registry import PromotionPolicy, promote
    from cushing.workflows.studies import load_study

    base = dict(load_study(ns.project).promote) if ns.project else {}
    given = {k: v for k, v in (("metric", ns.metric), ("min_value", ns.min_value), ("max_sex_gap", ns.max_sex_gap),
                               ("max_subgroup_gap", ns.max_subgroup_gap)) if v not in (None, "")}
    policy = PromotionPolicy(**{**base, **given, "allow_synthetic": ns.allow_synthetic})
    scope = _scope(ns)
    where = "" if scope.how == f"experiment {scope.experiment!r}" else f" in experiment {scope.experiment!r}"
    print(f"ranking runs of {scope.how}{where}")
    d = promote(experiment=scope.experiment, policy=policy, parent_run_id=scope.parent_run_id)
    if not d.ranking.empty:
        cols = ["rank", "run_name", policy.metric, "sex_gap", "val/auc", "test/f1 (not used)", "eligible",
                "excluded_because"]
        print(d.ranking[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(d.reason if d.changed or d.winner_run is None else f"no change: {d.reason}")
    if d.logged_run:
        print(f"decision logged to run {d.logged_run}")
    return 0 if d.winner_run else 1


COMMANDS["promote"] = ("register the best run on validation; move challenger/champion aliases", _promote_args,
                       _promote)
