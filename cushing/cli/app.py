"""The thin main: the parser built from every command family's COMMANDS (in this order), cooperative stops
(`cushing.stops`), the environment set once at start-up, and the errors a user made turned into one line and exit
code 2."""
from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Sequence

from cushing.cli import bench, cohort, dashboard, jobs, pipeline, promote, stack, studies, train
from cushing.cli.options import Command
from cushing.cli.stops import stopped
from cushing.config import ConfigError

__all__ = ["main", "build_parser", "COMMANDS"]

DESCRIPTION = "The `cushing` console script. Each subcommand parses, calls one core function, returns an exit code."
COMMANDS: dict[str, Command] = {**train.COMMANDS, **bench.COMMANDS, **cohort.COMMANDS, **jobs.COMMANDS,
                                **promote.COMMANDS, **studies.COMMANDS, **dashboard.COMMANDS, **pipeline.COMMANDS,
                                **stack.COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    from cushing import __version__

    parser = argparse.ArgumentParser(prog="cushing", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"cushing {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, configure, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        configure(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        _startup()
    try:
        return int(ns.func(ns) or 0)
    except KeyboardInterrupt as e:
        return stopped(ns.command, e)
    except (ConfigError, *_user_errors()) as e:
        print(f"cushing {ns.command}: {e}", file=sys.stderr)
        if os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`: its run, which MLflow ends FAILED, says why
            from cushing.tracking.runs import note_refusal

            note_refusal(e)
        return 2


def _startup() -> None:
    """Before any other thread runs: cooperative stops, and the environment the libraries read (MLflow's client
    retries, torch.compile's disk cache): nothing writes the environment later."""
    from cushing import stops
    from cushing.config import cache_home
    from cushing.tracking.connection import http_defaults

    stops.install()
    http_defaults(startup=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_home() / "inductor"))


def _user_errors() -> tuple[type[BaseException], ...]:
    """Imported when an error is being handled, not before every command: the data modules import pandas
    (a quarter of a second of `cushing --help` on a 2-core CPU)."""
    from cushing.data.manifest import ManifestError
    from cushing.data.splits import SplitError
    from cushing.faces.pipeline import BadPhotos
    from cushing.ops.stack import StackError
    from cushing.model.backbones import WeightsUnavailable
    from cushing.workflows.experiment import ResumeError
    from cushing.stats.subgroups import SubgroupError
    from cushing.tracking import TrackingUnavailable
    from cushing.model.train import AuditError

    return (ManifestError, SplitError, BadPhotos, StackError, WeightsUnavailable, FileNotFoundError,
            TrackingUnavailable, ResumeError, AuditError, SubgroupError)
