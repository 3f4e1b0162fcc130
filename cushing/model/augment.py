"""Augmentation and normalisation on the device: the paper's flip, crop, rotation and brightness as one affine
resample of a uint8 batch, then the backbone's mean/std (the engine's and the served model's one normalisation)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cushing.model.backbones import Preprocess

__all__ = ["DeviceAugment"]


@dataclass
class DeviceAugment:
    """Flip, random centre crop, rotation and brightness as one affine resample on the device, then normalise;
    strength scales the paper's ranges: rotation +-10 deg, crop to 80-100%, brightness +-20%."""

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
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        xf = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return self.normalize((xf * bright.view(b, 1, 1, 1)).clamp_(0, 255))
