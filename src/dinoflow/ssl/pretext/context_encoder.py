"""Context encoder (Pathak, Krähenbühl, Donahue, Darrell & Efros, "Context Encoders: Feature Learning by
Inpainting", CVPR 2016): a region of the image is blanked out, the backbone encodes the rest, a decoder paints the
region back; the loss is the L2 distance on the blanked region, plus (optionally) an adversarial term.

- Region: ``region: central`` (the paper's central square, ``region_fraction`` of the side) or ``random_block``
  (a square of the same size at a random place, the paper's random-block variant with one block). The region is
  filled with 0 in the normalised image, i.e. the dataset mean colour (the paper fills with the mean).
- Loss (paper Eq. 1-3): ``L = (1 - adversarial_weight) * L_rec + adversarial_weight * L_adv``, with
  ``L_rec`` the mean squared error over the pixels (and channels) of the region and ``L_adv`` the non-saturating
  generator loss ``-log D(prediction)``; the paper uses ``adversarial_weight = 0.001``; here it is off (0) by
  default. With it on, :class:`RegionDiscriminator` learns from ``-log D(real) - log(1 - D(fake))`` on detached
  predictions, while the generator term uses the discriminator's parameters detached
  (``torch.func.functional_call``), so one backward pass and one optimiser step train both players, each only
  on its own objective.
- Decoder: the backbone's last feature map (CNN) or patch tokens (ViT, laid back on their grid) go through
  up-convolutions (``ConvTranspose2d(4, stride 2)`` + GroupNorm + ReLU, halving channels, as the paper's decoder with
  GroupNorm for its BatchNorm, so that a sample's output does not depend on its batch) until
  the image size, then a 3x3 convolution to RGB (no tanh: targets are normalised pixels).

Example:
    >>> import numpy as np, torch
    >>> from dinoflow.ssl.pretext.context_encoder import ContextEncoderViews, InpaintingDecoder, reconstruction_loss
    >>> views = ContextEncoderViews(crop_size=16, region_fraction=0.5)
    >>> s = views(torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8), np.random.default_rng(0))
    >>> s["image"].shape, int(s["mask"].sum()), bool((s["image"][:, 4:12, 4:12] == 0).all())
    (torch.Size([3, 16, 16]), 64, True)
    >>> dec = InpaintingDecoder(in_dim=8, grid=2, out_size=16, hidden_dim=16)
    >>> dec(torch.randn(2, 8, 2, 2)).shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinoflow.errors import DinoflowError
from dinoflow.ssl.pretext.common import (IMAGENET_MEAN, IMAGENET_STD, check_mean_std, check_positive_int,
                                         check_scale, normalize, random_resized_crop, to_uint8_image)

REGIONS = ("central", "random_block")


def _norm(channels: int) -> nn.Module:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ContextEncoderViews:
    """Image -> ``{"image": (3, S, S) with the region zeroed, "target": (3, S, S) the full normalised crop,
    "mask": (1, S, S) bool (True on the region), "box": (4,) (top, left, height, width)}``."""

    section = "methods.context_encoder"

    def __init__(self, crop_size: int, region_fraction: float = 0.5, region: str = "central",
                 crop_scale: Sequence[float] = (0.32, 1.0), mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, flip: bool = True):
        self.crop_size = check_positive_int(self.section, "crop_size", crop_size)
        if not 0.0 < float(region_fraction) < 1.0:
            raise DinoflowError(f"{self.section}.region_fraction must be in (0, 1), got {region_fraction!r}")
        if region not in REGIONS:
            raise DinoflowError(f"{self.section}.region must be one of {REGIONS}, got {region!r}")
        self.region_side = max(1, int(round(self.crop_size * float(region_fraction))))
        self.region = region
        self.crop_scale = check_scale(self.section, crop_scale)
        self.mean, self.std = check_mean_std(mean, std)
        self.flip = bool(flip)

    def region_box(self, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the region to paint: centred, or uniformly placed for ``random_block``."""
        s, r = self.crop_size, self.region_side
        if self.region == "central":
            top = left = (s - r) // 2
        else:
            top, left = (int(v) for v in rng.integers(0, s - r + 1, size=2))
        return top, left, r, r

    def __call__(self, image: Any, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        crop = random_resized_crop(to_uint8_image(image), self.crop_size, self.crop_scale, rng, flip=self.flip)
        target = normalize(crop, self.mean, self.std)
        top, left, h, w = self.region_box(rng)
        mask = torch.zeros(1, self.crop_size, self.crop_size, dtype=torch.bool)
        mask[:, top: top + h, left: left + w] = True
        return {"image": target.masked_fill(mask, 0.0), "target": target, "mask": mask,
                "box": torch.tensor((top, left, h, w), dtype=torch.long)}


def collate_context_encoder(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples: ``image``/``target`` ``(B, 3, S, S)``, ``mask`` ``(B, 1, S, S)``, ``box`` ``(B, 4)``."""
    if not samples:
        raise DinoflowError("context_encoder: empty batch")
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class InpaintingDecoder(nn.Module):
    """Feature map ``(B, D, grid, grid)`` -> image ``(B, 3, out_size, out_size)``.

    ``1x1 conv(D, hidden)``, then ``ceil(log2(out_size / grid))`` up-convolutions (``ConvTranspose2d(k=4, s=2, p=1)``
    + GroupNorm(8) + ReLU, channels halved down to 16), a bilinear resize when the size is not reached exactly, and a 3x3
    conv to 3 channels.
    """

    def __init__(self, in_dim: int, grid: int, out_size: int, hidden_dim: int = 256):
        super().__init__()
        self.in_dim = check_positive_int("context_encoder decoder", "in_dim", in_dim)
        self.grid = check_positive_int("context_encoder decoder", "grid", grid)
        self.out_size = check_positive_int("methods.context_encoder", "crop_size", out_size)
        hidden_dim = check_positive_int("methods.context_encoder", "decoder_dim", hidden_dim)
        self.n_up = max(0, math.ceil(math.log2(self.out_size / self.grid)))
        layers: list[nn.Module] = [nn.Conv2d(self.in_dim, hidden_dim, 1), _norm(hidden_dim),
                                   nn.ReLU(inplace=True)]
        ch = hidden_dim
        self._ups = nn.ModuleList()
        for _ in range(self.n_up):
            nxt = max(16, ch // 2)
            self._ups.append(nn.Sequential(nn.ConvTranspose2d(ch, nxt, 4, stride=2, padding=1, bias=False),
                                           _norm(nxt), nn.ReLU(inplace=True)))
            ch = nxt
        self.stem = nn.Sequential(*layers)
        self.to_rgb = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if fmap.ndim != 4 or fmap.shape[1] != self.in_dim or fmap.shape[-1] != self.grid:
            raise DinoflowError(f"InpaintingDecoder: expected (B, {self.in_dim}, {self.grid}, {self.grid}) features, "
                                f"got {tuple(fmap.shape)}")
        x = self.stem(fmap)
        for up in self._ups:
            x = up(x)
        if tuple(x.shape[-2:]) != (self.out_size, self.out_size):
            x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return self.to_rgb(x)


def tokens_to_map(patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """ViT patch tokens ``(B, N, D)`` -> feature map ``(B, D, h, w)`` (row-major tokens, ``N = h * w``)."""
    b, n, d = patch_tokens.shape
    if n != grid[0] * grid[1]:
        raise DinoflowError(f"context_encoder: {n} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
    return patch_tokens.transpose(1, 2).reshape(b, d, grid[0], grid[1])


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked pixels: ``sum(mask * (pred - target)^2) / (3 * sum(mask))``.

    ``prediction``/``target`` ``(B, 3, S, S)``, ``mask`` ``(B, 1, S, S)`` bool (Pathak et al. Eq. 1, normalised by
    the region size).
    """
    if prediction.shape != target.shape or mask.shape[-2:] != target.shape[-2:]:
        raise DinoflowError(f"context_encoder: prediction {tuple(prediction.shape)}, target {tuple(target.shape)} "
                            f"and mask {tuple(mask.shape)} do not match")
    m = mask.to(prediction.dtype).expand_as(prediction)
    n = m.sum()
    if n == 0:
        raise DinoflowError("context_encoder: the mask selects no pixel")
    return ((prediction - target) ** 2 * m).sum() / n


def crop_regions(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The ``(top, left, h, w)`` box of each image: ``(B, C, h, w)`` (all boxes share one size)."""
    sizes = {(int(b[2]), int(b[3])) for b in boxes}
    if len(sizes) != 1:
        raise DinoflowError(f"context_encoder: regions of different sizes in one batch: {sorted(sizes)}")
    return torch.stack([x[i, :, int(b[0]): int(b[0]) + int(b[2]), int(b[1]): int(b[1]) + int(b[3])]
                        for i, b in enumerate(boxes)])


class RegionDiscriminator(nn.Module):
    """Region ``(B, 3, r, r)`` -> real/fake logit ``(B,)``: stride-2 4x4 convs + LeakyReLU(0.2) (DCGAN, as the
    paper's adversarial discriminator) until the map is at most 4x4, then global average and a linear layer."""

    def __init__(self, region_side: int, width: int = 32):
        super().__init__()
        region_side = check_positive_int("context_encoder", "region_side", region_side)
        width = check_positive_int("methods.context_encoder", "discriminator_dim", width)
        layers: list[nn.Module] = []
        ch, side = 3, region_side
        while side > 4:
            layers += [nn.Conv2d(ch, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            ch, side, width = width, side // 2, width * 2
        if not layers:
            layers = [nn.Conv2d(ch, width, 3, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            ch = width
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(ch, 1)

    def forward(self, region: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(region).mean(dim=(2, 3))).squeeze(1)


def adversarial_losses(discriminator: RegionDiscriminator, real: torch.Tensor,
                       fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(generator_loss, discriminator_loss)`` of Pathak et al. Eq. 2 (non-saturating generator loss).

    ``generator_loss = BCE(D(fake), 1)`` with the discriminator's parameters detached (gradients reach only the
    generator); ``discriminator_loss = BCE(D(real), 1) + BCE(D(fake.detach()), 0)`` (gradients reach only the
    discriminator). Summing both and calling ``backward`` once trains each player on its own objective.
    """
    frozen = {k: v.detach() for k, v in discriminator.named_parameters()}
    frozen.update({k: v for k, v in discriminator.named_buffers()})
    fake_logits_g = torch.func.functional_call(discriminator, frozen, (fake,))
    g_loss = F.binary_cross_entropy_with_logits(fake_logits_g, torch.ones_like(fake_logits_g))
    real_logits = discriminator(real.detach())
    fake_logits_d = discriminator(fake.detach())
    d_loss = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
              + F.binary_cross_entropy_with_logits(fake_logits_d, torch.zeros_like(fake_logits_d)))
    return g_loss, d_loss
