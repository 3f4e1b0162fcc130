"""The `cushing` console script (`cushing.cli:main`, `python -m cushing`, every MLproject entry point). Each
subcommand parses, calls one core function with explicit keyword arguments, returns an exit code.

Owns: `app` (the thin main: the parser, the signal handlers, user errors as exit code 2), `stops` (SIGTERM and
Ctrl-C: one line, the run KILLED), `options` (options several commands share), and one module per command family:
`train` (train, demo-data, models), `bench`, `cohort` (faces, audit), `jobs` (explain, evaluate, compare),
`promote`, `studies` (sweep, tune), `dashboard`, `pipeline` (all of them in one command), `stack`. A new command: a
module with its COMMANDS, listed in `app.COMMANDS`. May import every subpackage, but only inside the command that
runs it (so `cushing --help` starts without torch, mlflow or optuna); at module level only `cushing.config` and
this package.
"""
from __future__ import annotations

from cushing.cli.app import build_parser, main

__all__ = ["main", "build_parser"]
