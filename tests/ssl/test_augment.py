"""Multi-crop augmentation and collate: shapes, dtypes, known values, seeding, solarisation on global crop 2 only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinoflow.errors import DinoflowError
from dinoflow.ssl.augment import (
    MultiCropAugmentation,
    MultiCropCollator,
    MultiCropDataset,
    collate_multicrop,
    sample_seed,
)

G, L, NL = 24, 12, 3


def _aug(**kw) -> MultiCropAugmentation:
    return MultiCropAugmentation(global_crop_size=G, local_crop_size=L, n_local_crops=NL, **kw)


def _image(seed: int = 0, size: int = 40) -> torch.Tensor:
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_dtypes():
    crops = _aug()(_image(), seed=0)
    assert len(crops) == 2 + NL
    assert [tuple(c.shape) for c in crops] == [(3, G, G)] * 2 + [(3, L, L)] * NL
    assert all(c.dtype == torch.float32 and type(c) is torch.Tensor for c in crops)


def test_normalisation_known_value_on_constant_image():
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    aug = _aug(mean=mean, std=std, color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)
    img = torch.stack([torch.full((40, 40), v, dtype=torch.uint8) for v in (51, 102, 204)])
    for crop in aug(img, seed=1):
        for c, v in enumerate((51, 102, 204)):
            torch.testing.assert_close(crop[c], torch.full_like(crop[c], (v / 255 - mean[c]) / std[c]),
                                       atol=2e-2, rtol=0)


def test_solarisation_only_on_second_global_crop():
    aug = _aug(mean=(0, 0, 0), std=(1, 1, 1), color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0),
               solarize_p=1.0)
    crops = aug(torch.full((3, 40, 40), 200, dtype=torch.uint8), seed=0)
    values = [round(float(c.mean()) * 255) for c in crops]
    assert values == [200, 255 - 200] + [200] * NL


def test_same_seed_same_crops_and_global_rng_untouched():
    aug, img = _aug(), _image()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = aug(img, seed=5)
    after = torch.rand(1)
    b = aug(img, seed=5)
    c = aug(img, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert torch.equal(after, expected_next)  # the seeded call used a private stream


def test_pil_and_tensor_inputs_agree_and_gray_is_expanded():
    aug, img = _aug(), _image(2)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    assert all(torch.equal(x, y) for x, y in zip(aug(img, seed=3), aug(pil, seed=3)))
    gray = aug(Image.fromarray(img[0].numpy(), mode="L"), seed=3)
    assert gray[0].shape == (3, G, G)
    float_img = img.float() / 255
    assert all(torch.equal(x, y) for x, y in zip(aug(img, seed=4), aug(float_img, seed=4)))


def test_bad_inputs_raise():
    with pytest.raises(DinoflowError, match="global_crop_scale"):
        MultiCropAugmentation(global_crop_scale=(0.5, 0.2))
    with pytest.raises(DinoflowError, match="n_local_crops"):
        MultiCropAugmentation(n_local_crops=-1)
    with pytest.raises(DinoflowError, match="shape"):
        _aug()(torch.zeros(4, 20, 20, dtype=torch.uint8))
    with pytest.raises(DinoflowError, match="PIL image or a tensor"):
        _aug()(np.zeros((20, 20, 3), dtype=np.uint8))


def test_from_params_reads_train_section():
    train = {"global_crop_size": 28, "local_crop_size": 14, "n_local_crops": 2, "global_crop_scale": [0.32, 1.0],
             "local_crop_scale": [0.05, 0.32]}
    crops = MultiCropAugmentation.from_params(train)(_image(), seed=0)
    assert [c.shape[-1] for c in crops] == [28, 28, 14, 14]


class _Store:
    """ImageStore-like: ``len`` and ``get(i)`` returning PIL images."""

    def __init__(self, n: int):
        self.images = [Image.fromarray(_image(i).permute(1, 2, 0).numpy()) for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def get(self, i: int) -> Image.Image:
        return self.images[i]


def test_dataset_seeds_by_seed_epoch_index_not_by_call_order():
    ds = MultiCropDataset(_Store(4), _aug(), seed=9)
    forward = [ds[i] for i in range(4)]
    backward = [ds[i] for i in reversed(range(4))][::-1]
    assert all(torch.equal(a[0][0], b[0][0]) and a[1] == b[1] for a, b in zip(forward, backward))
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0][0], forward[0][0][0])
    assert sample_seed(9, 1, 0) != sample_seed(9, 0, 1)


def test_collate_is_view_major_with_masks_for_global_crops():
    ds = MultiCropDataset([_image(i) for i in range(5)], _aug(), seed=0)
    samples = [ds[i] for i in range(5)]
    collate = MultiCropCollator(patch_grid=G // 4, mask_ratio=(0.1, 0.5), mask_probability=0.5, seed=0)
    batch = collate(samples)
    assert batch["global_crops"].shape == (2 * 5, 3, G, G)
    assert batch["local_crops"].shape == (NL * 5, 3, L, L)
    for v in range(2):
        for b in range(5):
            assert torch.equal(batch["global_crops"][v * 5 + b], samples[b][0][v])
    for v in range(NL):
        assert torch.equal(batch["local_crops"][v * 5 + 4], samples[4][0][2 + v])
    assert batch["indices"].tolist() == [0, 1, 2, 3, 4]
    assert batch["masks"].shape == (10, (G // 4) ** 2)
    assert 1 <= int((batch["masks"].sum(1) > 0).sum()) <= 5
    assert batch["n_global_crops"] == 2 and batch["n_local_crops"] == NL


def test_collator_masks_depend_on_seed_epoch_and_indices_only():
    samples = [([torch.zeros(3, G, G)] * 2, i) for i in range(8)]
    collate = MultiCropCollator(patch_grid=6, seed=1)
    a, b = collate(samples), collate(samples)
    assert torch.equal(a["masks"], b["masks"])
    collate.set_epoch(1)
    assert not torch.equal(collate(samples)["masks"], a["masks"])
    no_masks = MultiCropCollator(patch_grid=None)(samples)
    assert "masks" not in no_masks and no_masks["local_crops"] is None


def test_collate_rejects_ragged_samples():
    with pytest.raises(DinoflowError, match="same number"):
        collate_multicrop([([torch.zeros(3, 4, 4)] * 3, 0), ([torch.zeros(3, 4, 4)] * 2, 1)])


def test_works_in_a_dataloader():
    ds = MultiCropDataset([_image(i) for i in range(6)], _aug(), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=MultiCropCollator(patch_grid=4))
    batches = list(loader)
    assert len(batches) == 2 and batches[1]["global_crops"].shape == (6, 3, G, G)
    assert torch.equal(batches[1]["global_crops"][0], ds[3][0][0])
