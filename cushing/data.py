"""Decode once, keep uint8 images on the device, augment on the device.

Images are letterboxed to a square (white padding, as the face stage pads) and held as uint8 [N, 3, S, S]:
on the accelerator when they fit the memory budget, otherwise in pinned host memory and streamed per batch.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import Preprocess

__all__ = ["decode_image", "decode_images", "ImageBank", "DeviceAugment", "pick_device", "training_device", "device_name", "letterbox"]

_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}


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
    import os
    import platform

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu x{os.cpu_count()} ({platform.processor() or platform.machine()})"


def letterbox(img, size: int, interpolation: str = "bicubic", fill: int = 255):
    """Fit inside size x size keeping the aspect ratio; pad with `fill` (white, as face crops are padded)."""
    from PIL import Image

    w, h = img.size
    s = size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    img = img.resize((nw, nh), _RESAMPLE.get(interpolation, 3))
    canvas = Image.new("RGB", (size, size), (fill, fill, fill))
    canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def decode_image(path: str, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """uint8 [3, S, S] from an image file: EXIF orientation, odd modes converted as the face stage does."""
    from PIL import Image

    from .imageio import open_rgb

    rgb = open_rgb(path, draft=size * 2)
    return np.asarray(letterbox(Image.fromarray(rgb), size, interpolation)).transpose(2, 0, 1).copy()


def decode_images(paths: Sequence[str], size: int, interpolation: str = "bicubic", workers: int = 0,
                  progress: bool = False) -> torch.Tensor:
    """uint8 [N, 3, S, S] on the CPU; decoding runs on a thread pool (PIL releases the GIL)."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    workers = workers or min(32, os.cpu_count() or 1)

    def one(i: int) -> None:
        out[i] = torch.from_numpy(decode_image(paths[i], size, interpolation))
    with ThreadPoolExecutor(workers) as pool:
        it = pool.map(one, range(len(paths)))
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, total=len(paths), desc="decode", unit="img", leave=False)
        for _ in it:
            pass
    return out


class ImageBank:
    """Decoded images addressable by index on the training device.

    Resident on the device when they fit `budget_bytes`; otherwise in pinned host memory, copied per batch.
    """

    def __init__(self, images: torch.Tensor, device: torch.device, budget_bytes: float):
        self.device = device
        self.nbytes = images.numel() * images.element_size()
        self.resident = self.nbytes <= budget_bytes
        if self.resident:
            self.images = images.to(device)
        else:
            self.images = images.pin_memory() if device.type == "cuda" else images
        self.shape = tuple(images.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        if self.resident:
            return self.images.index_select(0, idx.to(self.device))
        batch = self.images.index_select(0, idx.cpu())
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)


@dataclass
class DeviceAugment:
    """Flip, random centre crop, rotation and brightness as one affine resample on the device, then normalise.

    strength scales the paper's ranges: rotation +-10 deg, crop to 80-100%, brightness +-20%.
    """

    pre: Preprocess
    device: torch.device
    strength: float = 1.0
    channels_last: bool = False

    def __post_init__(self) -> None:
        std = torch.tensor(self.pre.std, device=self.device).view(1, 3, 1, 1)
        mean = torch.tensor(self.pre.mean, device=self.device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._bias = -mean / std
        self._fmt = torch.channels_last if self.channels_last else torch.contiguous_format

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> normalised float32 in the model's memory format."""
        return torch.addcmul(self._bias, x.float(), self._scale).contiguous(memory_format=self._fmt)

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        if self.strength <= 0:
            return self.normalize(x)
        b, dev, s = x.shape[0], x.device, self.strength
        u = torch.rand((b, 4), device=dev, generator=gen)
        angle = (u[:, 0] * 2 - 1) * math.radians(10.0) * s
        crop = 1.0 - min(0.2 * s, 0.5) * u[:, 1]  # sampling-grid scale < 1 zooms into the centre
        flip = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
        bright = 1.0 + (u[:, 3] * 2 - 1) * 0.2 * s
        cos, sin = angle.cos() * crop, angle.sin() * crop
        theta = torch.stack([torch.stack([cos * flip, -sin, torch.zeros_like(cos)], 1),
                             torch.stack([sin * flip, cos, torch.zeros_like(cos)], 1)], 1)
        xf = x.float()
        grid = F.affine_grid(theta, list(xf.shape), align_corners=False)
        xf = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)
        xf = (xf * bright.view(b, 1, 1, 1)).clamp_(0, 255)
        return torch.addcmul(self._bias, xf, self._scale).contiguous(memory_format=self._fmt)
