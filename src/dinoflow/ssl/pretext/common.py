"""Shared pieces of the pretext-task views: image conversion, a NumPy-seeded random resized crop, normalisation.

Every random choice of a pretext view (crop box, flip, rotation, patch position, permutation, mask) is drawn from
the ``numpy.random.Generator`` passed in, and from nothing else, so one per-sample seed (e.g.
``dinoflow.ssl.augment.sample_seed(seed, epoch, index)``) fixes the whole sample, whatever the other generators
did, with any number of DataLoader workers and after a resume.

Example:
    >>> import numpy as np, torch
    >>> from dinoflow.ssl.pretext.common import random_resized_crop, to_uint8_image
    >>> x = to_uint8_image(torch.zeros(3, 40, 50))
    >>> random_resized_crop(x, 16, (0.5, 1.0), np.random.default_rng(0)).shape
    torch.Size([3, 16, 16])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from dinoflow.errors import DinoflowError
from dinoflow.ssl.methods.base import IMAGENET_MEAN, IMAGENET_STD, to_uint8_rgb  # noqa: F401 (re-exported)


def to_uint8_image(image: Any) -> torch.Tensor:
    """PIL image or ``(C, H, W)`` tensor (uint8, or float in [0, 1]) -> ``(3, H, W)`` uint8 RGB tensor (the view
    seam's `dinoflow.ssl.methods.base.to_uint8_rgb`, made contiguous)."""
    return to_uint8_rgb(image).contiguous()


def check_positive_int(section: str, name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, else a DinoflowError naming ``section.name``."""
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise DinoflowError(f"{section}.{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_scale(section: str, scale: Sequence[float]) -> tuple[float, float]:
    """A crop-area range ``[min, max]`` with ``0 < min <= max <= 1``."""
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise DinoflowError(f"{section}.crop_scale must be [min, max] with 0 < min <= max <= 1, got {scale!r}")
    return float(scale[0]), float(scale[1])


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` (10 tries, then a centre crop), drawn from ``rng``.

    Returns ``(top, left, h, w)``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # fallback: centre crop of the whole image at a ratio inside the range
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float], rng: np.random.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """Random resized crop of a ``(3, H, W)`` uint8 image to ``(3, size, size)`` (bicubic, antialiased), then a
    horizontal flip with probability 0.5 when ``flip``. With ``scale=(1, 1)``, ``ratio=(1, 1)``, ``flip=False`` and
    a square image of side ``size`` this is the identity (the tests rely on it)."""
    top, left, h, w = crop_box(int(x.shape[-2]), int(x.shape[-1]), scale, ratio, rng)
    out = v2.functional.resized_crop(x, top, left, h, w, [size, size],
                                     interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    if flip and rng.random() < 0.5:
        out = out.flip(-1)
    return out


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` -> float32 ``(x / 255 - mean) / std``."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x.to(torch.float32) / 255.0 - m) / s


def check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DinoflowError(f"pretext views: mean/std need 3 values and std > 0, got {mean!r}, {std!r}")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def numpy_rng(generator: torch.Generator | np.random.Generator) -> np.random.Generator:
    """A NumPy generator drawn from the view seam's per-sample ``torch.Generator`` (one 63-bit draw), or the NumPy
    generator itself: the pretext views draw all their randomness from it."""
    if isinstance(generator, np.random.Generator):
        return generator
    return np.random.default_rng(int(torch.randint(0, 2**63 - 1, (1,), generator=generator)))


def check_patch_multiple(backbone: Any, section: str, name: str, size: int) -> None:
    """For a ViT backbone, ``size`` (an input side in pixels) must be a multiple of its patch size."""
    if getattr(backbone, "is_vit", False) and size % backbone.patch_size:
        raise DinoflowError(f"{section}.{name} ({size} px) must be a multiple of the ViT patch size "
                            f"({backbone.patch_size}) of {backbone.arch}")


def feature_grid(backbone: Any, size: int) -> int:
    """Side of the backbone's token grid / last feature map for a ``size`` x ``size`` input.

    ViT: ``size // patch_size``; CNN: one probe pass in eval mode (so BatchNorm running statistics are not
    touched), the mode restored afterwards. Raises DinoflowError for a non-square map.
    """
    was_training = backbone.training
    backbone.eval()
    try:
        h, w = backbone.patch_grid(size, size)
    finally:
        backbone.train(was_training)
    if h != w:
        raise DinoflowError(f"{backbone.arch}: a {size}x{size} input gives a non-square {h}x{w} feature map")
    return int(h)
