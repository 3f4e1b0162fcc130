"""Which device trains, serves or runs SAM, set up for speed; bf16 autocast on CUDA; how benchmarks name it.
Shared by every subpackage (like `cushing.config`)."""
from __future__ import annotations

import os
import platform
from contextlib import nullcontext

import torch

__all__ = ["pick_device", "training_device", "serving_device", "device_name", "autocast_for"]


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available here; use device=auto or cpu")
    return dev


def training_device(name: str = "auto") -> torch.device:
    """The device to train on, with cuDNN autotuning and TF32 matmuls switched on when it is a GPU."""
    dev = pick_device(name)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def device_name(dev: torch.device) -> str:
    """What benchmarks print and record: the GPU's name, or the CPU's core count and processor."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu x{os.cpu_count()} ({platform.processor() or platform.machine()})"


def serving_device() -> torch.device:
    """Where a served model runs: CUSHING_SERVE_DEVICE (default cpu; cuda falls back to the CPU without a GPU)."""
    want = os.environ.get("CUSHING_SERVE_DEVICE", "cpu")
    return pick_device(want) if not want.startswith("cuda") or torch.cuda.is_available() else torch.device("cpu")


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (the engine, scoring and SAM's image encoder), nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
