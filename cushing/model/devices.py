"""Which device trains or serves, set up for speed, and how benchmarks name it."""
from __future__ import annotations

import os
import platform

import torch

__all__ = ["pick_device", "training_device", "device_name"]


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
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
