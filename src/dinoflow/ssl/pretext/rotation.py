"""Rotation prediction (Gidaris, Singh & Komodakis, "Unsupervised Representation Learning by Predicting Image
Rotations", ICLR 2018): each image is rotated by 0, 90, 180 or 270 degrees and the network classifies the rotation
(4-way cross-entropy).

Label ``k`` means the image was turned ``k * 90`` degrees counter-clockwise (``torch.rot90(x, k, dims=(-2, -1))``).
The paper feeds all four rotations of every image in the same batch (its best setting); ``rotations_per_image``
< 4 takes that many distinct rotations, chosen per sample by the seeded generator.

Example:
    >>> import numpy as np, torch
    >>> from dinoflow.ssl.pretext.rotation import RotationViews, collate_rotation, rotation_loss
    >>> views = RotationViews(crop_size=16, rotations_per_image=4)
    >>> sample = views(torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8), np.random.default_rng(0))
    >>> sample["images"].shape, sample["labels"].tolist()
    (torch.Size([4, 3, 16, 16]), [0, 1, 2, 3])
    >>> batch = collate_rotation([sample, sample])
    >>> batch["images"].shape, batch["labels"].shape
    (torch.Size([8, 3, 16, 16]), torch.Size([8]))
    >>> float(rotation_loss(torch.zeros(8, 4), batch["labels"]))  # uniform logits: log 4
    1.3862...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinoflow.errors import DinoflowError
from dinoflow.ssl.pretext.common import (IMAGENET_MEAN, IMAGENET_STD, check_mean_std, check_positive_int,
                                         check_scale, normalize, random_resized_crop, to_uint8_image)

N_ROTATIONS = 4


def rotate(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` (``(..., H, W)``) turned ``k * 90`` degrees counter-clockwise (exact, no interpolation)."""
    return torch.rot90(x, int(k) % N_ROTATIONS, dims=(-2, -1))


class RotationViews:
    """Image -> ``{"images": (R, 3, S, S) float32, "labels": (R,) int64}`` with R = ``rotations_per_image``.

    The image is first randomly cropped and resized to a square ``crop_size`` (scale ``crop_scale``, aspect 3/4-4/3,
    horizontal flip), normalised with ``mean``/``std``, then rotated. Labels are sorted (0..3 with R = 4).
    """

    section = "methods.rotation"

    def __init__(self, crop_size: int, crop_scale: Sequence[float] = (0.32, 1.0), rotations_per_image: int = 4,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, flip: bool = True):
        self.crop_size = check_positive_int(self.section, "crop_size", crop_size)
        self.crop_scale = check_scale(self.section, crop_scale)
        self.rotations_per_image = check_positive_int(self.section, "rotations_per_image", rotations_per_image)
        if self.rotations_per_image > N_ROTATIONS:
            raise DinoflowError(f"{self.section}.rotations_per_image must be 1..4, got {rotations_per_image!r}")
        self.mean, self.std = check_mean_std(mean, std)
        self.flip = bool(flip)

    def __call__(self, image: Any, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        x = random_resized_crop(to_uint8_image(image), self.crop_size, self.crop_scale, rng, flip=self.flip)
        if self.rotations_per_image == N_ROTATIONS:
            labels = np.arange(N_ROTATIONS)
        else:
            labels = np.sort(rng.permutation(N_ROTATIONS)[: self.rotations_per_image])
        x = normalize(x, self.mean, self.std)
        return {"images": torch.stack([rotate(x, k) for k in labels]),
                "labels": torch.as_tensor(labels, dtype=torch.long)}


def collate_rotation(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate samples: ``images`` ``(B * R, 3, S, S)`` (sample-major), ``labels`` ``(B * R,)``."""
    if not samples:
        raise DinoflowError("rotation: empty batch")
    return {"images": torch.cat([s["images"] for s in samples]), "labels": torch.cat([s["labels"] for s in samples])}


class RotationHead(nn.Module):
    """Embedding ``(B, D)`` -> rotation logits ``(B, 4)``.

    Gidaris et al. put a small classifier on top of the features; here: ``Linear(D, hidden) -> ReLU -> Linear(hidden, 4)``
    (``hidden_dim = 0``: a single linear layer). No batch norm: a sample's logits do not depend on the other samples
    of its batch, so N processes compute what one does.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 256):
        super().__init__()
        in_dim = check_positive_int("rotation head", "in_dim", in_dim)
        hidden_dim = check_positive_int("methods.rotation", "head_hidden_dim", hidden_dim, minimum=0)
        if hidden_dim:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
                                     nn.Linear(hidden_dim, N_ROTATIONS))
        else:
            self.net = nn.Linear(in_dim, N_ROTATIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of rotation logits ``(B, 4)`` against labels ``(B,)`` in 0..3 (Gidaris et al. Eq. 2)."""
    return F.cross_entropy(logits, labels)
