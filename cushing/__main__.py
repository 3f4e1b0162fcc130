import atexit
import os
import sys

_status: int | None = None  # main's exit code; None while it runs or when it raised (a normal exit then)


def _leave() -> None:
    """Registered before anything else, so the last exit handler to run: the interpreter has already done what an
    exit must (other threads' exit hooks and joins, every other exit handler: MLflow ending a run left active,
    temporary folders removed, logging flushed); leave without tearing it down module by module (seconds of
    freeing torch, timm, MLflow and pandas that the OS does at once)."""
    if _status is None:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said through it
            pass
    os._exit(_status)


atexit.register(_leave)

from cushing.cli import main  # noqa: E402  (after the registration: its imports register exit handlers too)

_status = int(main() or 0)
sys.exit(_status)
