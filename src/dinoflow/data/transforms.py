"""Evaluation preprocessing from a model's timm `data_config`: resize to img_size, centre crop, normalise.

Split in two so the data pipeline never becomes the bottleneck:
- `EvalTransform` (per image, in DataLoader workers): PIL -> uint8 tensor, resize (short side) and centre crop
  to the model's input size. uint8 batches are 4x smaller to collate, pin and copy to the GPU than float.
- `Normalize` (per batch, on the model's device): uint8 -> float in [0, 1] -> (x - mean) / std.
`eval_transform` composes both for single images (same result as timm's eval transform with crop_pct = 1).

crop_pct is deliberately 1: the stored images are already square 256 px crops or pads (`dinoflow preprocess`),
so a second, tighter crop would only cut off the object's border.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

_INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                   "nearest": InterpolationMode.NEAREST, "lanczos": InterpolationMode.LANCZOS}


def _size(data_config: dict[str, Any]) -> tuple[int, int]:
    _, h, w = data_config["input_size"]
    return int(h), int(w)


class EvalTransform:
    """PIL image -> uint8 tensor (3, H, W) at the model's input size (resize short side, centre crop)."""

    def __init__(self, data_config: dict[str, Any]):
        self.size = _size(data_config)
        self.interpolation = _INTERPOLATIONS.get(str(data_config.get("interpolation", "bicubic")),
                                                 InterpolationMode.BICUBIC)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        x = F.pil_to_tensor(image.convert("RGB"))
        x = F.resize(x, [min(self.size)], interpolation=self.interpolation, antialias=True)
        return F.center_crop(x, list(self.size))

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, interpolation={self.interpolation.value})"


class Normalize(torch.nn.Module):
    """uint8 batch (B, 3, H, W) -> normalised float batch, on whatever device the batch is."""

    def __init__(self, data_config: dict[str, Any]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(data_config["std"], dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def eval_transform(data_config: dict[str, Any]):
    """Single-image eval transform: PIL -> normalised float tensor (3, H, W)."""
    resize, norm = EvalTransform(data_config), Normalize(data_config)
    return lambda image: norm(resize(image).unsqueeze(0))[0]
