"""Block masking: counts never exceed the target, ratios within bounds, masks are unions of rectangles, seeded."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dinoflow.errors import DinoflowError
from dinoflow.ssl.masking import MaskingGenerator, sample_masks


def _gen(grid: int = 14) -> MaskingGenerator:
    return MaskingGenerator(grid, max_num_patches=0.5 * grid * grid)  # DINOv2's setting


@pytest.mark.parametrize("target", [0, 1, 10, 40, 98])
def test_count_never_exceeds_target_and_usually_reaches_it(target):
    gen = _gen()
    rng = np.random.default_rng(target)
    counts = [int(gen(target, rng).sum()) for _ in range(30)]
    assert max(counts) <= target
    assert np.mean(counts) >= 0.8 * target


def test_masks_are_blocks_not_scattered_pixels():
    gen = _gen()
    mask = gen(60, np.random.default_rng(0))
    _, n_components = ndimage.label(mask)
    # 60 patches from blocks of >= 4 patches: far fewer connected pieces than masked patches.
    assert 1 <= n_components <= 60 // 4


def test_same_seed_same_masks_other_seed_differs():
    gen = _gen()
    a = [gen(50, np.random.default_rng(3)) for _ in range(2)]
    b = gen(50, np.random.default_rng(4))
    np.testing.assert_array_equal(a[0], a[1])
    assert not np.array_equal(a[0], b)


def test_sample_masks_follows_dinov2_collate():
    gen, n_images, lo, hi, prob = _gen(), 16, 0.1, 0.5, 0.5
    out = sample_masks(n_images, gen, (lo, hi), prob, np.random.default_rng(0))
    masks = out["masks"].numpy()
    n_tokens = gen.num_patches
    counts = masks.sum(1)
    assert masks.shape == (n_images, n_tokens) and masks.dtype == bool
    assert (counts > 0).sum() <= int(n_images * prob)
    assert (counts == 0).sum() >= n_images - int(n_images * prob)
    assert counts.max() <= int(n_tokens * hi)
    ratios = counts[counts > 0] / n_tokens
    assert lo * 0.8 <= ratios.mean() <= hi  # bins cover [lo, hi]; the generator may stop a little short
    np.testing.assert_array_equal(out["mask_indices"].numpy(), np.flatnonzero(masks.reshape(-1)))
    assert out["n_masked_patches"] == counts.sum() <= out["upperbound"]
    assert out["masks_weight"].sum().item() == pytest.approx((counts > 0).sum())


def test_sample_masks_seeded():
    gen = _gen(8)
    a = sample_masks(10, gen, (0.1, 0.5), 0.5, np.random.default_rng(7))
    b = sample_masks(10, gen, (0.1, 0.5), 0.5, np.random.default_rng(7))
    c = sample_masks(10, gen, (0.1, 0.5), 0.5, np.random.default_rng(8))
    assert (a["masks"] == b["masks"]).all()
    assert not (a["masks"] == c["masks"]).all()


def test_probability_zero_and_one():
    gen = _gen(8)
    none = sample_masks(6, gen, (0.1, 0.5), 0.0, np.random.default_rng(0))
    assert none["n_masked_patches"] == 0 and none["masks"].shape == (6, 64)
    every = sample_masks(6, gen, (0.3, 0.4), 1.0, np.random.default_rng(0))
    assert (every["masks"].sum(1) > 0).all()


@pytest.mark.parametrize("ratio, prob, word", [((0.5, 0.1), 0.5, "mask_ratio"), ((0.1, 1.5), 0.5, "mask_ratio"),
                                               ((0.1, 0.5), 1.2, "mask_probability")])
def test_bad_parameters_raise(ratio, prob, word):
    with pytest.raises(DinoflowError, match=word):
        sample_masks(4, _gen(4), ratio, prob, np.random.default_rng(0))
