"""What a stopped command says: one line instead of a traceback, naming what stopped it, the run it marked KILLED
and how to continue (signals themselves are handled by `cushing.stops`)."""
from __future__ import annotations

import sys

from cushing import stops

__all__ = ["stopped"]


def _resume_hint(run: str) -> str:
    from cushing.model.checkpoint import has_local_checkpoint
    from cushing.tracking import get_run

    try:
        saved = has_local_checkpoint(run) or "checkpoint_epoch" in get_run(run).tags
    except Exception:  # the tracking store went away too: say what is certain
        saved = has_local_checkpoint(run)
    if saved:
        return f" (continue it from its last checkpoint: cushing train --resume {run})"
    return " (it stopped before its first checkpoint, see checkpoint_minutes: train it again)"


def stopped(command: str, e: KeyboardInterrupt) -> int:
    """Print the line; the exit code is the shell's for the signal (130 Ctrl-C, 143 SIGTERM)."""
    name = getattr(e, "signame", None) or stops.requested() or "SIGINT"
    run = getattr(e, "cushing_run", None)
    where = f"; run {run} is marked KILLED" if run else ""
    hint = _resume_hint(run) if run and command == "train" else ""
    print(f"cushing {command}: stopped by {name}{where}{hint}", file=sys.stderr)
    return stops.exit_code(name)
