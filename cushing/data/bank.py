"""Decode once and keep the cohort as uint8 [N, 3, S, S], letterboxed to a square (white padding, as the face stage
pads): on the accelerator when it fits the memory budget, otherwise in pinned host memory, streamed per batch."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from cushing import stops
from cushing.data.imageio import open_rgb

__all__ = ["decode_image", "decode_images", "ImageBank", "letterbox"]


def letterbox(img, size: int, interpolation: str = "bicubic", fill: int = 255):
    """Fit inside size x size keeping the aspect ratio; pad with `fill` (white, as face crops are padded)."""
    from PIL import Image

    w, h = img.size
    s = size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    img = img.resize((nw, nh), getattr(Image.Resampling, interpolation.upper(), Image.Resampling.BICUBIC))
    canvas = Image.new("RGB", (size, size), (fill, fill, fill))
    canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def decode_image(path: str, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """uint8 [3, S, S] from an image file: EXIF orientation, odd modes converted as the face stage does."""
    from PIL import Image

    rgb = open_rgb(path, draft=size * 2)
    return np.asarray(letterbox(Image.fromarray(rgb), size, interpolation)).transpose(2, 0, 1).copy()


def decode_images(paths: Sequence[str], size: int, interpolation: str = "bicubic", workers: int = 0,
                  progress: bool = False) -> torch.Tensor:
    """uint8 [N, 3, S, S] on the CPU; decoding runs on a thread pool (PIL releases the GIL), in chunks with a safe
    point for a stop between them."""
    from tqdm.auto import tqdm

    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    workers = workers or min(32, os.cpu_count() or 1)

    def one(i: int) -> None:
        out[i] = torch.from_numpy(decode_image(paths[i], size, interpolation))
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(paths), desc="decode", unit="img", leave=False,
                                                   disable=not progress) as bar:
        for start in range(0, len(paths), 16 * workers):
            stops.check()
            chunk = range(start, min(start + 16 * workers, len(paths)))
            list(pool.map(one, chunk))
            bar.update(len(chunk))
    return out


class ImageBank:
    """Decoded images addressable by index on the training device: resident there when they fit `budget_bytes`,
    otherwise in pinned host memory, copied per batch."""

    def __init__(self, images: torch.Tensor, device: torch.device, budget_bytes: float):
        self.device = device
        self.resident = images.numel() * images.element_size() <= budget_bytes
        pinned = images.pin_memory() if device.type == "cuda" and not self.resident else images
        self.images = images.to(device) if self.resident else pinned

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        if self.resident:
            return self.images.index_select(0, idx.to(self.device))
        batch = self.images.index_select(0, idx.cpu())
        return (batch.pin_memory() if self.device.type == "cuda" else batch).to(self.device, non_blocking=True)
