"""Whether a run's process still lives: every open run tags its host, process and machine and beats
(`cushing.heartbeat`); a RUNNING run whose process is gone on its own machine, or whose heartbeat is older than
CUSHING_RUN_STALE_S, is dead (`queries.reap` marks it)."""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

from cushing.tracking.connection import client
from cushing.tracking.records import RunRecord

__all__ = ["machine_id"]


def _process_id(pid: int) -> str:
    """pid:start-time, so that a recycled pid is not taken for the process that died."""
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{pid}:{start}"


def machine_id() -> str:
    """Which kernel and pid namespace a pid means something in: containers that share a hostname (or a host's
    network) each have their own pids, so a pid is checked only where boot id and pid namespace both match. Across
    machines the heartbeat decides (clocks more than CUSHING_RUN_STALE_S apart would need NTP)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return "unknown"
    return f"{boot}:{ns}"


def _alive(process: str) -> bool:
    pid = int(process.split(":")[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _process_id(pid) == process or process.endswith(":?")


class _Heartbeat:
    """A daemon thread that tags its run `cushing.heartbeat` (unix seconds) every CUSHING_RUN_HEARTBEAT_S."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.interval = float(os.environ.get("CUSHING_RUN_HEARTBEAT_S", "30"))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"run-heartbeat-{run_id[:8]}", daemon=True)

    def start(self) -> None:
        client().set_tag(self.run_id, "cushing.process", f"{socket.gethostname()}/{_process_id(os.getpid())}")
        client().set_tag(self.run_id, "cushing.machine", machine_id())
        self._beat()
        self.thread.start()

    def _beat(self) -> None:
        client().set_tag(self.run_id, "cushing.heartbeat", str(int(time.time())))

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            with contextlib.suppress(Exception):  # a brief server outage; the next beat tries again
                self._beat()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(5)


def _dead_because(run: "RunRecord", now: float) -> str | None:
    """Why a RUNNING run's process is gone, or None while it may still live."""
    tags, beat = run.tags, run.tags.get("cushing.heartbeat")
    if run.status != "RUNNING" or beat is None:
        return None
    host, _, process = tags.get("cushing.process", "/").partition("/")
    if host == socket.gethostname() and tags.get("cushing.machine") == machine_id() and process and not _alive(process):
        return f"its process ({process.split(':')[0]} on {host}) is gone"
    stale = float(os.environ.get("CUSHING_RUN_STALE_S", "180"))
    if now - float(beat) > stale:
        return f"no heartbeat for {now - float(beat):.0f} s (more than {stale:.0f} s)"
    return None
