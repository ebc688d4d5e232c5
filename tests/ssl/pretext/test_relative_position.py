"""Relative patch position: the position of a known patch pair in a coordinate-coded image, jitter and gap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoflow.errors import DinoflowError
from dinoflow.ssl.pretext.relative_position import (NEIGHBOURS, drop_colors, RelativePositionHead, RelativePositionViews,
                                                    collate_relative_position, relative_position_loss)


def _coordinate_image(size: int) -> torch.Tensor:
    """Red = row, green = column (so a patch tells where it was cut)."""
    rows = torch.arange(size, dtype=torch.uint8).view(size, 1).expand(size, size)
    cols = torch.arange(size, dtype=torch.uint8).view(1, size).expand(size, size)
    return torch.stack([rows, cols, torch.zeros_like(rows)])


def test_labels_match_the_geometry_of_the_cut_patches():
    views = RelativePositionViews(patch_size=10, gap=6, jitter=2, crop_scale=(1.0, 1.0), mean=(0, 0, 0),
                                  std=(1, 1, 1), flip=False)
    size = views.region_size
    assert size == 3 * 10 + 2 * 6 + 2 * 2
    img = _coordinate_image(size)
    step = 10 + 6
    labels = set()
    for seed in range(60):
        s = views(img, np.random.default_rng(seed))
        label = int(s["label"])
        labels.add(label)
        a_top, a_left = (round(float(v) * 255) for v in s["anchor"][:2, 0, 0])
        n_top, n_left = (round(float(v) * 255) for v in s["neighbour"][:2, 0, 0])
        assert (a_top, a_left) == tuple(s["anchor_box"].tolist())
        assert (n_top, n_left) == tuple(s["neighbour_box"].tolist())
        # the anchor is the centre cell, moved by at most the jitter
        assert abs(a_top - (step + 2)) <= 2 and abs(a_left - (step + 2)) <= 2
        dr, dc = NEIGHBOURS[label]
        assert abs((n_top - a_top) - dr * step) <= 4 and abs((n_left - a_left) - dc * step) <= 4
        # patches never touch: at least gap - 2 * jitter pixels between them
        if dr:
            assert abs(n_top - a_top) - 10 >= 6 - 4
        if dc:
            assert abs(n_left - a_left) - 10 >= 6 - 4
        # the patch is a plain slice of the image
        torch.testing.assert_close(s["neighbour"], img[:, n_top:n_top + 10, n_left:n_left + 10].float() / 255)
    assert labels == set(range(8))


def test_neighbour_order_is_row_major():
    assert NEIGHBOURS == ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def test_seeded_and_collated():
    views = RelativePositionViews(patch_size=6, gap=2, jitter=1)
    img = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    a, b = views(img, np.random.default_rng(5)), views(img, np.random.default_rng(5))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    batch = collate_relative_position([a, b])
    assert batch["anchor"].shape == (2, 3, 6, 6) and batch["label"].shape == (2,)
    assert batch["anchor_box"].shape == (2, 2)


def test_loss_is_cross_entropy_and_head_uses_the_order():
    torch.manual_seed(0)
    head = RelativePositionHead(5, 16)
    x, y = torch.randn(4, 5), torch.randn(4, 5)
    logits = head(x, y)
    assert logits.shape == (4, 8)
    assert not torch.allclose(logits, head(y, x))
    labels = torch.tensor([0, 3, 7, 4])
    expected = -F.log_softmax(logits, dim=1)[torch.arange(4), labels].mean()
    torch.testing.assert_close(relative_position_loss(logits, labels), expected)


def test_jitter_larger_than_half_the_gap_is_refused():
    with pytest.raises(DinoflowError, match="jitter"):
        RelativePositionViews(patch_size=8, gap=2, jitter=2)


def test_color_drop_keeps_one_channel_and_replaces_the_others_by_faint_noise():
    g = torch.Generator().manual_seed(0)
    patch = torch.randn(3, 16, 16, generator=g) * 2.0 + 1.0
    kept = set()
    for seed in range(12):
        out = drop_colors(patch, np.random.default_rng(seed))
        same = [c for c in range(3) if torch.equal(out[c], patch[c])]
        assert len(same) == 1
        c = same[0]
        kept.add(c)
        for other in set(range(3)) - {c}:
            assert float(out[other].std()) == pytest.approx(float(patch[c].std()) / 100, rel=0.25)
            assert abs(float(out[other].mean())) < float(patch[c].std()) / 100
    assert kept == {0, 1, 2}
    views = RelativePositionViews(patch_size=8, gap=4, jitter=1, color_drop=True)
    img = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    a, b = views(img, np.random.default_rng(3)), views(img, np.random.default_rng(3))
    torch.testing.assert_close(a["anchor"], b["anchor"])
