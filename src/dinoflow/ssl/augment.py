"""DINO multi-crop augmentation (torchvision transforms v2) and the collate function that adds iBOT masks.

Design choice: crops are made **per image inside the Dataset** (``MultiCropDataset``), not on the batch. Each crop
has its own random box, scale and photometric parameters, so a batched version would still loop over images; v2
kernels already vectorise over the pixels of one image, and DataLoader workers parallelise over images. Nothing
loops over pixels in Python. Work is done in uint8 (as the PIL pipeline of DINO: solarisation threshold 128) and
converted to normalised float32 at the end.

Recipe (DINO / DINOv2 ``DataAugmentationDINO``): random resized crop (bicubic) + horizontal flip; colour jitter
(0.4, 0.4, 0.2, 0.1) with p=0.8; grayscale p=0.2; Gaussian blur (sigma 0.1-2) with p=1.0 on the first global crop,
0.1 on the second and 0.5 on local crops; solarisation (p=0.2) on the second global crop only; normalisation.
(DINOv2's ``GaussianBlur`` passes ``1 - p`` to ``RandomApply``, which inverts those probabilities; we use the
probabilities of the DINO paper, which that code intends.)

Determinism: ``MultiCropAugmentation(image, seed=s)`` draws from a private torch generator state seeded with
``s``; ``MultiCropDataset`` derives ``s`` from (seed, epoch, index), and ``MultiCropCollator`` seeds the masks from
(seed, epoch, batch indices). So a batch depends only on those numbers: the same with any number of workers and
after resuming mid-epoch.

Example:
    >>> import torch
    >>> from dinoflow.ssl.augment import MultiCropAugmentation, MultiCropDataset, MultiCropCollator
    >>> aug = MultiCropAugmentation(global_crop_size=28, local_crop_size=14, n_local_crops=2)
    >>> images = [torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8) for _ in range(3)]
    >>> ds = MultiCropDataset(images, aug, seed=0)
    >>> collate = MultiCropCollator(patch_grid=28 // 14, mask_ratio=(0.1, 0.5), mask_probability=0.5, seed=0)
    >>> batch = collate([ds[i] for i in range(3)])
    >>> batch["global_crops"].shape, batch["local_crops"].shape, batch["masks"].shape
    (torch.Size([6, 3, 28, 28]), torch.Size([6, 3, 14, 14]), torch.Size([6, 4]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from dinoflow.errors import DinoflowError
from dinoflow.ssl.masking import MaskingGenerator, check_mask_params, sample_masks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise DinoflowError(f"train.{name} must be [min, max] with 0 < min <= max <= 1, got {scale!r}")
    return float(scale[0]), float(scale[1])


def _blur_kernel(size: int) -> int:
    """DINOv2's 9-pixel kernel, shrunk to an odd size that fits tiny crops (reflect padding needs pad < size)."""
    k = min(9, size if size % 2 else size - 1)
    return max(k, 1)


def sample_seed(*numbers: int) -> int:
    """A 32-bit seed derived from integers (seed, epoch, index ...): independent streams for every combination."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1)[0])


class MultiCropAugmentation:
    """Image (PIL or ``(C, H, W)`` uint8 / float tensor) -> list of normalised float32 crops: 2 global, then locals.

    Probabilities are arguments so tests and ablations can switch parts off; defaults are DINO's recipe.
    """

    def __init__(self, global_crop_size: int = 224, local_crop_size: int = 96, n_local_crops: int = 8,
                 global_crop_scale: Sequence[float] = (0.32, 1.0), local_crop_scale: Sequence[float] = (0.05, 0.32),
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 flip_p: float = 0.5, color_jitter_p: float = 0.8, grayscale_p: float = 0.2,
                 blur_p: Sequence[float] = (1.0, 0.1, 0.5), solarize_p: float = 0.2):
        for name, v in {"global_crop_size": global_crop_size, "local_crop_size": local_crop_size}.items():
            if int(v) != v or v < 1:
                raise DinoflowError(f"train.{name} must be a positive integer, got {v!r}")
        if int(n_local_crops) != n_local_crops or n_local_crops < 0:
            raise DinoflowError(f"train.n_local_crops must be an integer >= 0, got {n_local_crops!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise DinoflowError(f"MultiCropAugmentation: mean/std need 3 values and std > 0, got {mean!r}, {std!r}")
        if len(blur_p) != 3:
            raise DinoflowError(f"MultiCropAugmentation: blur_p needs 3 probabilities (global1, global2, local), "
                                f"got {blur_p!r}")
        self.global_crop_size, self.local_crop_size = int(global_crop_size), int(local_crop_size)
        self.n_local_crops = int(n_local_crops)
        self.global_crop_scale = _check_scale("global_crop_scale", global_crop_scale)
        self.local_crop_scale = _check_scale("local_crop_scale", local_crop_scale)
        bicubic = v2.InterpolationMode.BICUBIC

        def geometric(size: int, scale: tuple[float, float]) -> list:
            return [v2.RandomResizedCrop(size, scale=scale, interpolation=bicubic, antialias=True),
                    v2.RandomHorizontalFlip(p=flip_p)]

        colour = [v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                                 p=color_jitter_p),
                  v2.RandomGrayscale(p=grayscale_p)]

        def blur(size: int, p: float) -> v2.Transform:
            return v2.RandomApply([v2.GaussianBlur(kernel_size=_blur_kernel(size), sigma=(0.1, 2.0))], p=p)

        finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
        g, lc = self.global_crop_size, self.local_crop_size
        self.global1 = v2.Compose(geometric(g, self.global_crop_scale) + colour + [blur(g, blur_p[0])] + finish)
        self.global2 = v2.Compose(geometric(g, self.global_crop_scale) + colour + [blur(g, blur_p[1]),
                                  v2.RandomSolarize(threshold=128, p=solarize_p)] + finish)
        self.local = v2.Compose(geometric(lc, self.local_crop_scale) + colour + [blur(lc, blur_p[2])] + finish)

    @classmethod
    def from_params(cls, train: dict[str, Any], mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> "MultiCropAugmentation":
        """Build from the ``train`` section of params.yaml (mean/std from the encoder's timm data config)."""
        return cls(global_crop_size=train["global_crop_size"], local_crop_size=train["local_crop_size"],
                   n_local_crops=train["n_local_crops"], global_crop_scale=train["global_crop_scale"],
                   local_crop_scale=train["local_crop_scale"], mean=mean, std=std)

    @staticmethod
    def _to_uint8_rgb(image: Any) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = image.convert("RGB") if image.mode != "RGB" else image
        elif not isinstance(image, torch.Tensor):
            raise DinoflowError(f"MultiCropAugmentation: expected a PIL image or a tensor, got {type(image).__name__}")
        x = v2.functional.to_dtype(v2.functional.to_image(image), torch.uint8, scale=True)
        if x.ndim != 3 or x.shape[0] not in (1, 3):
            raise DinoflowError(f"MultiCropAugmentation: expected a (1 or 3, H, W) image, got shape {tuple(x.shape)}")
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x

    def _crops(self, x: torch.Tensor) -> list[torch.Tensor]:
        crops = [self.global1(x), self.global2(x)] + [self.local(x) for _ in range(self.n_local_crops)]
        return [c.as_subclass(torch.Tensor) for c in crops]

    def __call__(self, image: Any, seed: int | None = None) -> list[torch.Tensor]:
        x = self._to_uint8_rgb(image)
        if seed is None:
            return self._crops(x)
        with torch.random.fork_rng(devices=[]):  # private stream: the global torch RNG is left untouched
            torch.manual_seed(seed)
            return self._crops(x)


class MultiCropDataset(torch.utils.data.Dataset):
    """``images[i]`` (or ``images.get(i)`` for an ``ImageStore``) -> ``(crops, i)``, crops seeded by (seed, epoch, i).

    Call ``set_epoch(e)`` before each epoch (before iterating the DataLoader, so fresh workers copy it).
    """

    def __init__(self, images: Any, augmentation: MultiCropAugmentation, seed: int = 0):
        self.images, self.augmentation, self.seed, self.epoch = images, augmentation, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        image = self.images.get(i) if hasattr(self.images, "get") else self.images[i]
        return self.augmentation(image, seed=sample_seed(self.seed, self.epoch, i)), int(i)


def collate_multicrop(samples: Sequence[tuple[Sequence[torch.Tensor], int]], n_global_crops: int = 2,
                      mask_generator: MaskingGenerator | None = None, mask_ratio: Sequence[float] = (0.1, 0.5),
                      mask_probability: float = 0.5, rng: np.random.Generator | None = None) -> dict[str, Any]:
    """Stack ``(crops, index)`` samples view-major, as DINOv2 (``global_crops.chunk(n_global_crops)`` gives views).

    Returns ``global_crops`` ``(n_global * B, C, G, G)``, ``local_crops`` ``(n_local * B, C, L, L)`` (``None``
    without local crops), ``indices`` ``(B,)``, ``n_global_crops``, ``n_local_crops``, and, with a
    ``mask_generator`` (patch grid of the global crops), the iBOT masks of every global crop from
    :func:`dinoflow.ssl.masking.sample_masks` (``masks``, ``mask_indices``, ``masks_weight``, ``n_masked_patches``,
    ``upperbound``).
    """
    if not samples:
        raise DinoflowError("collate_multicrop: empty batch")
    n_crops = len(samples[0][0])
    if any(len(s[0]) != n_crops for s in samples) or n_crops < n_global_crops:
        raise DinoflowError(f"collate_multicrop: every sample needs the same number (>= {n_global_crops}) of crops")
    n_local = n_crops - n_global_crops
    out: dict[str, Any] = {
        "global_crops": torch.stack([s[0][v] for v in range(n_global_crops) for s in samples]),
        "local_crops": (torch.stack([s[0][v] for v in range(n_global_crops, n_crops) for s in samples])
                        if n_local else None),
        "indices": torch.tensor([int(s[1]) for s in samples], dtype=torch.long),
        "n_global_crops": n_global_crops,
        "n_local_crops": n_local,
    }
    if mask_generator is not None:
        if rng is None:
            raise DinoflowError("collate_multicrop: masks need a numpy Generator (rng) for reproducibility")
        out.update(sample_masks(len(out["global_crops"]), mask_generator, mask_ratio, mask_probability, rng))
    return out


class MultiCropCollator:
    """DataLoader ``collate_fn``: :func:`collate_multicrop` with masks seeded by (seed, epoch, batch indices).

    ``patch_grid`` is ``global_crop_size // patch_size`` (``None`` for CNN backbones: no masks). DINOv2 caps one
    mask rectangle at half the grid (``max_num_patches = 0.5 * N``).
    """

    def __init__(self, patch_grid: int | None, mask_ratio: Sequence[float] = (0.1, 0.5),
                 mask_probability: float = 0.5, seed: int = 0, n_global_crops: int = 2):
        self.mask_ratio = check_mask_params(mask_ratio, mask_probability)
        self.mask_probability = float(mask_probability)
        self.generator = (MaskingGenerator(patch_grid, max_num_patches=0.5 * patch_grid * patch_grid)
                          if patch_grid else None)
        self.seed, self.epoch, self.n_global_crops = int(seed), 0, n_global_crops

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, samples: Sequence[tuple[Sequence[torch.Tensor], int]]) -> dict[str, Any]:
        indices = [int(s[1]) for s in samples]
        rng = np.random.default_rng([self.seed, self.epoch, *indices])
        return collate_multicrop(samples, self.n_global_crops, self.generator, self.mask_ratio,
                                 self.mask_probability, rng)
