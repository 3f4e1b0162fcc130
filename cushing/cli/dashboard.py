"""`cushing dashboard`: the self-contained HTML dashboard of an experiment or a sweep."""
from __future__ import annotations

import argparse
import sys

from cushing.cli.options import Command, _scope, _scope_options

COMMANDS: dict[str, Command] = {}


def _dashboard_args(p: argparse.ArgumentParser) -> None:
    _scope_options(p, "show")
    p.add_argument("--out", default="dashboard.html")
    p.add_argument("--definition", default="paper", help="a dashboards/<name>.yaml definition")
    p.add_argument("--no-log", action="store_true", help="do not log the page to MLflow")


def _dashboard(ns: argparse.Namespace) -> int:
    from cushing.workflows.dashboard import DashboardError, build_dashboard

    scope = _scope(ns)
    try:
        path = build_dashboard(experiment=scope.experiment, parent_run_id=scope.parent_run_id, out=ns.out,
                               name=ns.definition, log=not ns.no_log)
    except DashboardError as e:
        print(f"cushing dashboard: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} from {scope.how} (self-contained; open it in a browser or in the MLflow UI's artifact "
          "view)")
    return 0


COMMANDS["dashboard"] = ("build the self-contained HTML dashboard (Tables I-III, ROC, calibration, CAMs)",
                         _dashboard_args, _dashboard)
