"""Options more than one command shares: one --option per config field, values MLproject may pass as '' (unset),
counts, booleans, compile modes, and which runs a command looks at (--experiment, --parent-run, --project)."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Callable

from cushing.config import COMPILE_MODES, TrainConfig, parse_bool, resolve

__all__ = ["Command", "add_config_options", "config_from"]

# a subcommand: (help, what adds its options, what runs it and returns the exit code)
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _opt_float(text: str) -> float | None:
    """A float option that MLproject may pass as '' (unset)."""
    return None if text in ("", "none", "None") else float(text)


def add_config_options(p: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """One --option per config field, all parsed as strings and coerced by the typed config."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = getattr(hints[f.name], "__name__", str(hints[f.name])).replace("typing.", "")
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar=kind.upper()[:5],
                       help=f"default: {'auto' if default is None and f.name == 'freeze' else default}")


def config_from(ns: argparse.Namespace, cls: type = TrainConfig, base=None):
    overrides = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if getattr(ns, f.name, None) is not None}
    return resolve(cls, overrides, base=base)


def _scope_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--experiment", default=None,
                   help="experiment to look in (default: that of --parent-run or --project, else "
                        "MLFLOW_EXPERIMENT_NAME or the `mlflow run` run's, else cushing)")
    p.add_argument("--parent-run", default=None, help=f"{what} only the children of this (sweep) run")
    p.add_argument("--project", default=None, help="a study file: its experiment and its sweep's parent run"
                                                   " (and, for promote, its `promote:` policy)")
    p.add_argument("--storage", default=None, help="the study's Optuna storage (default as for `cushing sweep`)")


def _scope(ns: argparse.Namespace):
    from cushing.workflows.sweeps import resolve_scope

    return resolve_scope(experiment=ns.experiment or None, parent_run_id=ns.parent_run or None,
                         project=ns.project or None, storage=ns.storage or None)


def _count(text: str, unset: tuple[str, ...], what: str, least: str) -> int | None:
    """A positive count, or None for the texts that mean unset (MLproject passes '' for an unset parameter)."""
    if text in unset:
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{least}, got {n}")
    return n


def _opt_count(text: str) -> int | None:
    """A positive count, or None for '' (MLproject's unset)."""
    return _count(text, ("", "None", "0"), "a positive number", "a positive number")


def _yes(text: str) -> bool:
    """A boolean in the words `parse_bool` takes, '' for false (MLproject's unset)."""
    try:
        return bool(str(text).strip()) and parse_bool(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"true or false, got {text!r}") from None


def _workers(text: str) -> int | None:
    """A worker count, or None for auto."""
    return _count(text, ("", "auto", "0"), "a number of workers or auto", "at least 1 worker")


def _compile_mode(text: str) -> str | None:
    """A compile mode, or None for '' (MLproject's unset)."""
    if text in ("", "None"):
        return None
    if text not in COMPILE_MODES:
        raise argparse.ArgumentTypeError(f"one of {', '.join(COMPILE_MODES)}, got {text!r}")
    return text


def _compile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", default=None, type=_compile_mode, metavar="MODE",
                   help=f"{' | '.join(COMPILE_MODES)}: torch.compile mode for every fine-tuned configuration "
                        "(default: the file's); pays off with a warm compile cache (a rerun, other folds, seeds or "
                        "trials of the same architecture)")
