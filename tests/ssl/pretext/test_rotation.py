"""Rotation prediction: the rotation of a known image, the seeded choice of rotations, the loss formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinoflow.errors import DinoflowError
from dinoflow.ssl.pretext.rotation import (RotationHead, RotationViews, collate_rotation, rotate, rotation_loss)


def _marked_image(size: int = 16) -> torch.Tensor:
    x = torch.full((3, size, size), 100, dtype=torch.uint8)
    x[:, 0, 0] = 255  # top-left marker
    x[0, 0, size - 1] = 0  # top-right marker (red channel only)
    return x


def test_rotate_is_counter_clockwise_quarter_turns():
    x = _marked_image()[0]
    s = x.shape[-1] - 1
    # k = 1 (90 degrees counter-clockwise): top-left -> bottom-left, top-right -> top-left
    assert rotate(x, 1)[s, 0] == 255 and rotate(x, 1)[0, 0] == 0
    assert rotate(x, 2)[s, s] == 255 and rotate(x, 2)[s, 0] == 0
    assert rotate(x, 3)[0, s] == 255 and rotate(x, 3)[s, s] == 0
    for k in range(4):
        np.testing.assert_array_equal(rotate(x, k).numpy(), np.rot90(x.numpy(), k))
    torch.testing.assert_close(rotate(rotate(x, 1), 3), x)


def test_views_are_the_rotations_of_the_known_image():
    x = _marked_image(16)
    views = RotationViews(crop_size=16, crop_scale=(1.0, 1.0), rotations_per_image=4, mean=(0, 0, 0),
                          std=(1, 1, 1), flip=False)
    sample = views(x, np.random.default_rng(3))
    assert sample["labels"].tolist() == [0, 1, 2, 3]
    base = x.float() / 255
    for img, k in zip(sample["images"], sample["labels"].tolist()):
        torch.testing.assert_close(img, torch.rot90(base, k, dims=(1, 2)))
    assert sample["images"][1][:, 15, 0].tolist() == [1.0, 1.0, 1.0]  # the marker after a quarter turn


def test_fewer_rotations_are_distinct_seeded_and_vary():
    views = RotationViews(crop_size=8, rotations_per_image=2)
    img = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8)
    seen = set()
    for seed in range(30):
        a = views(img, np.random.default_rng(seed))
        b = views(img, np.random.default_rng(seed))
        torch.testing.assert_close(a["images"], b["images"])
        labels = a["labels"].tolist()
        assert len(set(labels)) == 2 and labels == sorted(labels) and all(0 <= k < 4 for k in labels)
        seen.add(tuple(labels))
    assert len(seen) > 3


def test_collate_and_loss_formula():
    views = RotationViews(crop_size=8)
    img = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8)
    batch = collate_rotation([views(img, np.random.default_rng(i)) for i in range(3)])
    assert batch["images"].shape == (12, 3, 8, 8) and batch["labels"].tolist() == [0, 1, 2, 3] * 3
    logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    rows = logits.double().tolist()
    expected = -np.mean([math.log(math.exp(r[k]) / sum(math.exp(v) for v in r))
                         for r, k in zip(rows, batch["labels"].tolist())])
    assert float(rotation_loss(logits, batch["labels"])) == pytest.approx(expected, rel=1e-5)


def test_head_shapes_and_bad_params():
    assert RotationHead(10, 0)(torch.randn(3, 10)).shape == (3, 4)
    assert RotationHead(10, 16)(torch.randn(3, 10)).shape == (3, 4)
    with pytest.raises(DinoflowError, match="rotations_per_image"):
        RotationViews(crop_size=8, rotations_per_image=5)
    with pytest.raises(DinoflowError, match="crop_scale"):
        RotationViews(crop_size=8, crop_scale=(0.0, 1.0))
