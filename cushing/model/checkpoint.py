"""Checkpoints of a training run, so a stopped run (SIGTERM, SIGKILL, a lost node) continues instead of starting over.

At an epoch end that is a multiple of `checkpoint_every`, once `checkpoint_minutes` (default 5) passed since the last
one, so sub-second epochs are not slowed by writes of ~3x the weights, the engine hands out a FitState. It is written
atomically (temporary file, fsync, rename: a kill mid-write leaves the previous one intact) to
`<cache_home>/checkpoints/<run_id>/checkpoint.pt`, and logged with the run only when `log_checkpoint` asks (then a
resume works on another host too). The local copy goes when the run finishes; a failed or killed run keeps it for
`--resume`. Loading unpickles nothing (torch.load weights_only=True).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from cushing.config import cache_home
from cushing.model.engine import FitState

__all__ = ["CHECKPOINT", "checkpoint_dir", "Checkpointer", "load_checkpoint", "remove_checkpoint", "FAULT_ENV",
           "has_local_checkpoint", "resume_lock", "ResumeBusy"]

CHECKPOINT = "checkpoint.pt"
FAULT_ENV = "CUSHING_FAULT"  # fault injection for the fault suite: "kill-in-checkpoint:<epoch>"


def checkpoint_dir(run_id: str) -> Path:
    return cache_home() / "checkpoints" / run_id


class Checkpointer:
    """The engine's checkpoint callback for one run; `on_saved(path, epoch)` runs after each completed write."""

    def __init__(self, run_id: str, on_saved: Callable[[Path, int], None] | None = None):
        self.dir = checkpoint_dir(run_id)
        self.on_saved = on_saved

    def __call__(self, state: FitState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / CHECKPOINT
        for stale in self.dir.glob(f".{CHECKPOINT}.*.tmp"):  # a write that was killed halfway
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{CHECKPOINT}.{os.getpid()}.tmp")
        torch.save(state.to_dict(), tmp)
        _fault(state.epoch, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if self.on_saved is not None:
            self.on_saved(path, state.epoch)


def _fault(epoch: int, tmp: Path) -> None:
    """`CUSHING_FAULT=kill-in-checkpoint:<epoch>`: die by SIGKILL halfway through writing that epoch's checkpoint,
    as an out-of-memory kill or a lost node would (the fault suite checks the previous checkpoint survives)."""
    if os.environ.get(FAULT_ENV) == f"kill-in-checkpoint:{epoch}":
        with open(tmp, "r+b") as f:
            f.truncate(max(1, tmp.stat().st_size // 2))
        os.kill(os.getpid(), signal.SIGKILL)


def has_local_checkpoint(run_id: str) -> bool:
    return (checkpoint_dir(run_id) / CHECKPOINT).exists()


class ResumeBusy(RuntimeError):
    """Another process on this host is resuming the same run."""


@contextmanager
def resume_lock(run_id: str) -> Iterator[None]:
    """Held for the whole of a resume: a second `--resume` of the same run on this host is refused at once instead
    of training into the same run and deleting the first one's checkpoint writes. (Across hosts the run's
    heartbeat refuses it: a RUNNING run whose process beats is not resumed.)"""
    checkpoint_dir(run_id).mkdir(parents=True, exist_ok=True)
    with open(checkpoint_dir(run_id) / ".resume.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResumeBusy(f"run {run_id} is being resumed by another process on this host") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_checkpoint(path: str | Path) -> FitState:
    return FitState.from_dict(torch.load(path, map_location="cpu", weights_only=True))


def remove_checkpoint(run_id: str) -> None:
    shutil.rmtree(checkpoint_dir(run_id), ignore_errors=True)
