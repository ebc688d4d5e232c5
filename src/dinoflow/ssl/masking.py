"""Block masking for iBOT (BEiT / DINOv2 ``MaskingGenerator``) and the per-batch mask sampling of DINOv2's collate.

Randomness comes only from the ``numpy.random.Generator`` passed in, so the same seed gives the same masks
whatever else consumed Python's, NumPy's or torch's global generators.

Example:
    >>> import numpy as np
    >>> from dinoflow.ssl.masking import MaskingGenerator, sample_masks
    >>> gen = MaskingGenerator(8, max_num_patches=32)         # 8x8 patch grid
    >>> gen(20, np.random.default_rng(0)).shape
    (8, 8)
    >>> batch = sample_masks(6, gen, mask_ratio=(0.1, 0.5), mask_probability=0.5, rng=np.random.default_rng(0))
    >>> batch["masks"].shape, int((batch["masks"].sum(1) > 0).sum()) <= 3
    (torch.Size([6, 64]), True)
    >>> int(batch["n_masked_patches"]) == len(batch["mask_indices"]) <= batch["upperbound"]
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from dinoflow.errors import DinoflowError
from dinoflow.ssl.losses.ibot import masks_weight  # one definition of the token weights, shared with the loss


class MaskingGenerator:
    """Masks of about ``k`` patches on an ``h x w`` grid, made of random rectangles (aspect ratio in
    ``[min_aspect, max_aspect]``, area between ``min_num_patches`` and ``max_num_patches`` per rectangle).

    Same algorithm as BEiT / DINOv2: rectangles are added until ``k`` patches are masked or ten tries in a row add
    nothing; a rectangle is kept only if it adds at most the patches still missing, so the count never exceeds ``k``.
    """

    def __init__(self, input_size: int | tuple[int, int], num_masking_patches: int | None = None,
                 min_num_patches: int = 4, max_num_patches: float | None = None, min_aspect: float = 0.3,
                 max_aspect: float | None = None):
        if not isinstance(input_size, tuple):
            input_size = (int(input_size),) * 2
        self.height, self.width = input_size
        if self.height < 1 or self.width < 1:
            raise DinoflowError(f"MaskingGenerator: patch grid must be at least 1x1, got {input_size}")
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = (num_masking_patches if max_num_patches is None else max_num_patches)
        if self.max_num_patches is None:
            self.max_num_patches = self.num_patches
        if min_aspect <= 0:
            raise DinoflowError(f"MaskingGenerator: min_aspect must be > 0, got {min_aspect}")
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (f"MaskingGenerator({self.height}x{self.width}, patches per block {self.min_num_patches}"
                f"..{self.max_num_patches}, log aspect {self.log_aspect_ratio[0]:.3f}..{self.log_aspect_ratio[1]:.3f})")

    @staticmethod
    def _uniform(rng: np.random.Generator, a: float, b: float) -> float:
        return a + (b - a) * rng.random()  # as random.uniform: also fine when b < a

    def _mask(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
        delta = 0
        for _ in range(10):
            target_area = self._uniform(rng, self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self._uniform(rng, *self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top: top + h, left: left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:  # overlap allowed, overshoot not
                    block[...] = True
                    delta += new
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        """Boolean ``(h, w)`` mask with at most ``num_masking_patches`` true entries."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches, rng)
            if delta == 0:
                break
            count += delta
        return mask


def check_mask_params(mask_ratio: Sequence[float], mask_probability: float) -> tuple[float, float]:
    """Validate ``train.mask_ratio`` / ``train.mask_probability``; returns the ratio as a float pair."""
    if len(mask_ratio) != 2 or not 0.0 <= mask_ratio[0] <= mask_ratio[1] <= 1.0:
        raise DinoflowError(f"train.mask_ratio must be [min, max] with 0 <= min <= max <= 1, got {mask_ratio!r}")
    if not 0.0 <= mask_probability <= 1.0:
        raise DinoflowError(f"train.mask_probability must be in [0, 1], got {mask_probability!r}")
    return float(mask_ratio[0]), float(mask_ratio[1])


def sample_masks(n_images: int, generator: MaskingGenerator, mask_ratio: Sequence[float],
                 mask_probability: float, rng: np.random.Generator) -> dict:
    """Masks for ``n_images`` global crops, as DINOv2's ``collate_data_and_cast``.

    ``int(n_images * mask_probability)`` images get a mask; the ratio range is split into that many equal bins
    and image ``i`` masks ``int(N * U(bin_i))`` patches (so the batch covers the whole range); the rest are unmasked;
    the list is shuffled. Returns ``masks`` (``(n_images, N)`` bool), ``mask_indices`` (flat indices of the masked
    tokens in ``(n_images * N)``), ``masks_weight`` (``1 / masked tokens of its image`` per masked token),
    ``n_masked_patches`` and ``upperbound`` (sum of the bins' maxima, an upper bound of the masked count).
    """
    lo, hi = check_mask_params(mask_ratio, mask_probability)
    n_tokens = generator.num_patches
    n_masked_images = int(n_images * mask_probability)
    bins = np.linspace(lo, hi, n_masked_images + 1)
    masks, upperbound = [], 0
    for i in range(n_masked_images):
        ratio = MaskingGenerator._uniform(rng, bins[i], bins[i + 1])
        masks.append(generator(int(n_tokens * ratio), rng))
        upperbound += int(n_tokens * bins[i + 1])
    masks += [generator(0, rng) for _ in range(n_images - n_masked_images)]
    order = rng.permutation(n_images)
    stacked = np.stack([masks[i] for i in order]).reshape(n_images, n_tokens) if n_images else \
        np.zeros((0, n_tokens), dtype=bool)
    collated = torch.from_numpy(stacked)
    mask_indices = collated.flatten().nonzero().flatten()
    return {
        "masks": collated,
        "mask_indices": mask_indices,
        "masks_weight": masks_weight(collated),
        "n_masked_patches": int(mask_indices.shape[0]),
        "upperbound": upperbound,
    }
