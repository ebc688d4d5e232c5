"""Evaluation preprocessing from a model's timm `data_config`: resize to img_size, centre crop, normalise.

Split in two so the data pipeline never becomes the bottleneck:
- `decode_rgb` + `EvalTransform` (per image, in DataLoader workers): encoded bytes -> uint8 tensor with
  torchvision.io (libwebp / libjpeg / libpng straight into a tensor: about half the time of PIL's decode plus
  conversions on the stored 256 px WebP), then resize (short side, torch's vectorised uint8 antialiased kernel,
  faster here than PIL's) and centre crop to the model's input size. uint8 batches are 4x smaller to collate,
  pin and copy to the GPU than float. (PIL's draft mode would decode at reduced size, but only for JPEG.)
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


def decode_rgb(data: bytes | memoryview) -> torch.Tensor:
    """Encoded image bytes (WebP, JPEG, PNG, ...) -> uint8 RGB tensor (3, H, W); PIL for formats torchvision
    cannot decode. Same pixels as PIL for the stored formats (both call the same libraries)."""
    from torchvision.io import ImageReadMode, decode_image

    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a writable copy: frombuffer warns otherwise
    try:
        return decode_image(buf, mode=ImageReadMode.RGB)
    except RuntimeError:
        import io

        with Image.open(io.BytesIO(bytes(data))) as im:
            return F.pil_to_tensor(im.convert("RGB"))


class EvalTransform:
    """PIL image or uint8 tensor (3, h, w) -> uint8 tensor (3, H, W) at the model's input size (resize short
    side, centre crop)."""

    def __init__(self, data_config: dict[str, Any]):
        self.size = _size(data_config)
        self.interpolation = _INTERPOLATIONS.get(str(data_config.get("interpolation", "bicubic")),
                                                 InterpolationMode.BICUBIC)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            x = image
        else:
            x = F.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
        if tuple(x.shape[-2:]) == self.size:
            return x  # already the input size: nothing to resample
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
