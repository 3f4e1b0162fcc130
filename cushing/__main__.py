import sys

from cushing.cli import main


def _exit(code: int) -> None:
    """Leave without tearing the interpreter down module by module (seconds of freeing torch, timm, MLflow and
    pandas that the OS does at once), after what an exit must still do: other threads finish, exit handlers run
    (MLflow ending a run left active, temporary folders removed, logging flushed), the output streams flush."""
    import atexit
    import os
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # what a normal exit runs first (CPython)
    if shutdown is not None:
        shutdown()  # threading's exit hooks (a ThreadPoolExecutor's workers are told to stop), then the joins
    else:
        for t in threading.enumerate():
            if t is not threading.main_thread() and not t.daemon:
                t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said through it
            pass
    os._exit(code)


_exit(int(main() or 0))
