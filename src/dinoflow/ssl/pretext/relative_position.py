"""Relative patch position (Doersch, Gupta & Efros, "Unsupervised Visual Representation Learning by Context
Prediction", ICCV 2015): the centre patch of a 3x3 grid and one of its 8 neighbours are embedded by the same
network; a classifier on the concatenated embeddings predicts which neighbour it was (8-way cross-entropy).

Geometry (paper Sec. 3): patches of ``patch_size`` pixels, ``gap`` pixels between grid cells so that the network
cannot match edges, and each patch shifted by up to ``jitter`` pixels in x and y so that it cannot match lines that
continue across the gap. The grid spans ``3 * patch_size + 2 * gap + 2 * jitter`` pixels (``region_size``): the
image is first randomly cropped and resized to that square. Against chromatic aberration (a shortcut that tells
where a patch was in the lens' field), ``color_drop`` applies the paper's colour dropping: in each patch two of the
three channels (chosen at random) are replaced by Gaussian noise with 1/100 of the kept channel's standard
deviation. (The paper's other remedy, colour projection, is not implemented.)

Labels follow the row-major order of the 8 neighbours (:data:`NEIGHBOURS`, the paper's Fig. 2 numbering minus 1):
0 = top-left, 1 = top, 2 = top-right, 3 = left, 4 = right, 5 = bottom-left, 6 = bottom, 7 = bottom-right.

Example:
    >>> import numpy as np, torch
    >>> from dinoflow.ssl.pretext.relative_position import RelativePositionViews, collate_relative_position
    >>> views = RelativePositionViews(patch_size=8, gap=4, jitter=1)
    >>> views.region_size
    34
    >>> s = views(torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8), np.random.default_rng(0))
    >>> s["anchor"].shape, s["neighbour"].shape, 0 <= int(s["label"]) < 8
    (torch.Size([3, 8, 8]), torch.Size([3, 8, 8]), True)
    >>> collate_relative_position([s, s])["label"].shape
    torch.Size([2])
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

# (row, column) offsets of the 8 neighbours from the centre cell; label i is NEIGHBOURS[i].
NEIGHBOURS: tuple[tuple[int, int], ...] = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
N_POSITIONS = len(NEIGHBOURS)


class RelativePositionViews:
    """Image -> ``{"anchor": (3, P, P), "neighbour": (3, P, P), "label": () int64, "anchor_box": (2,),
    "neighbour_box": (2,)}`` (boxes: ``(top, left)`` pixel of each patch inside the ``region_size`` crop).

    ``crop_scale`` is the area range of the random crop taken before the grid (``(1, 1)``: the whole image).
    """

    section = "methods.relative_position"

    def __init__(self, patch_size: int, gap: int, jitter: int, crop_scale: Sequence[float] = (0.6, 1.0),
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, flip: bool = True,
                 color_drop: bool = False):
        self.patch_size = check_positive_int(self.section, "patch_size", patch_size)
        self.gap = check_positive_int(self.section, "gap", gap, minimum=0)
        self.jitter = check_positive_int(self.section, "jitter", jitter, minimum=0)
        if 2 * self.jitter > self.gap:
            raise DinoflowError(f"{self.section}: 2 * jitter ({self.jitter}) must not exceed the gap ({self.gap}), "
                                "or neighbouring patches could touch or overlap")
        self.crop_scale = check_scale(self.section, crop_scale)
        self.mean, self.std = check_mean_std(mean, std)
        self.flip = bool(flip)
        self.color_drop = bool(color_drop)
        self.region_size = 3 * self.patch_size + 2 * self.gap + 2 * self.jitter

    def cell_origin(self, row: int, col: int) -> tuple[int, int]:
        """Top-left pixel of grid cell (row, col) in 0..2 before jitter (``jitter`` margin included)."""
        step = self.patch_size + self.gap
        return row * step + self.jitter, col * step + self.jitter

    def _box(self, row: int, col: int, rng: np.random.Generator) -> tuple[int, int]:
        top, left = self.cell_origin(row, col)
        dy, dx = rng.integers(-self.jitter, self.jitter + 1, size=2)
        return top + int(dy), left + int(dx)

    def __call__(self, image: Any, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        region = random_resized_crop(to_uint8_image(image), self.region_size, self.crop_scale, rng, flip=self.flip)
        label = int(rng.integers(N_POSITIONS))
        dr, dc = NEIGHBOURS[label]
        anchor_box = self._box(1, 1, rng)
        neighbour_box = self._box(1 + dr, 1 + dc, rng)
        p = self.patch_size

        def cut(box: tuple[int, int]) -> torch.Tensor:
            patch = normalize(region[:, box[0]: box[0] + p, box[1]: box[1] + p], self.mean, self.std)
            return drop_colors(patch, rng) if self.color_drop else patch

        return {"anchor": cut(anchor_box), "neighbour": cut(neighbour_box),
                "label": torch.tensor(label, dtype=torch.long),
                "anchor_box": torch.tensor(anchor_box, dtype=torch.long),
                "neighbour_box": torch.tensor(neighbour_box, dtype=torch.long)}


def drop_colors(patch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Doersch et al.'s colour dropping: keep one random channel of a ``(3, P, P)`` patch, replace the other two by
    Gaussian noise with 1/100 of the kept channel's standard deviation (drawn from ``rng``)."""
    keep = int(rng.integers(3))
    scale = float(patch[keep].std()) / 100.0
    noise = torch.from_numpy(rng.normal(0.0, 1.0, size=tuple(patch.shape)).astype(np.float32)) * scale
    out = noise
    out[keep] = patch[keep]
    return out


def collate_relative_position(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples: ``anchor``/``neighbour`` ``(B, 3, P, P)``, ``label`` ``(B,)``, boxes ``(B, 2)``."""
    if not samples:
        raise DinoflowError("relative_position: empty batch")
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class RelativePositionHead(nn.Module):
    """Two patch embeddings ``(B, D)`` each -> logits ``(B, 8)``.

    As Doersch et al.'s late fusion (fc6 per patch, fc7 on the concatenation, fc8): ``Linear(2D, hidden) -> ReLU ->
    Linear(hidden, 8)`` on ``cat(anchor, neighbour)``; the order matters (which patch is the centre).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512):
        super().__init__()
        in_dim = check_positive_int("relative_position head", "in_dim", in_dim)
        hidden_dim = check_positive_int("methods.relative_position", "head_hidden_dim", hidden_dim)
        self.net = nn.Sequential(nn.Linear(2 * in_dim, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, N_POSITIONS))

    def forward(self, anchor: torch.Tensor, neighbour: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([anchor, neighbour], dim=1))


def relative_position_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean 8-way cross-entropy of ``logits`` ``(B, 8)`` against the neighbour labels ``(B,)``."""
    return F.cross_entropy(logits, labels)
