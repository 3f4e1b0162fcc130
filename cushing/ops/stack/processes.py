"""The processes and ports of the stack: a free port, whether one listens, waiting for an HTTP answer, and
stopping a process group, only once it is checked to be this stack's (a saved group id is only a number)."""
from __future__ import annotations

import contextlib
import glob
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["StackError", "free_port", "port_open", "wait_http", "stop_group"]


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_http(url: str, timeout: float = 90.0, ok=(200,), proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    import urllib.error
    import urllib.request

    deadline, last = time.time() + timeout, ""
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise StackError(f"process exited with {proc.returncode} before {url} answered\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status in ok:
                    return
        except OSError as e:  # an HTTPError too: an expected error status is an answer
            if isinstance(e, urllib.error.HTTPError) and e.code in ok:
                return
            last = str(e)
        time.sleep(0.5)
    raise StackError(f"{url} did not answer within {timeout:.0f}s ({last})")


def stop_group(pgid: int, grace: float = 20.0) -> bool:
    """SIGTERM a process group, SIGKILL what is left after `grace` seconds; True when it is gone (also when it was
    gone already). Only for a group this process started or has checked is its own (`_group_is_ours`). A member
    that exited but was not yet reaped (a zombie: the leader is often the caller's own child) counts as gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        deadline = time.time() + wait
        while _group_members(pgid, live=True):
            if time.time() > deadline:
                break
            time.sleep(0.2)
        else:
            return True
    return False


def _listeners(port: int) -> set[int]:
    """Pids of processes with a socket listening on 127.0.0.1:port (from /proc, no tools needed)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for parts in (line.split() for line in Path(table).read_text().splitlines()[1:]):
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(parts[9])
    pids = set()
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if (link := os.readlink(fd)).startswith("socket:[") and link[8:-1] in inodes:
                pids.add(int(fd.split("/")[2]))
    return pids


def _ours(pid: int, base: Path) -> bool:
    """A server of this stack: its command line names the stack's artifact store, or its environment the stack's
    auth config (uvicorn's workers get it through the environment). False for a process that is gone or that
    this account cannot inspect."""
    proc = Path(f"/proc/{pid}")
    try:
        args = (proc / "cmdline").read_bytes().split(b"\0")
        env = (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return (str(base / "mlartifacts").encode() in args
            or f"MLFLOW_AUTH_CONFIG_PATH={base / 'basic_auth.ini'}".encode() in env)


def _group_members(pgid: int, live: bool = False) -> list[int]:
    """Pids of the processes in process group `pgid`, with `live` only those still running (not zombies), from
    /proc/PID/stat: pid (comm) state ppid pgrp ..."""
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = Path(stat).read_text()
            state, _, pgrp = text[text.rindex(")") + 2:].split()[:3]
            if int(pgrp) == pgid and not (live and state in "ZX"):
                pids.append(int(stat.split("/")[2]))
    return pids


def _group_is_ours(pgid: int, base: Path) -> bool:
    """A saved process group id is only a number: after a reboot or a long while it may be another program's
    (and `stack down` may run as root). It is this stack's when one of its processes is (`_ours`)."""
    return pgid > 0 and any(_ours(pid, base) for pid in _group_members(pgid))
