"""Context encoder: the masked region, the L2 loss on it, the decoder sizes, the adversarial split of gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoflow.errors import DinoflowError
from dinoflow.ssl.pretext.context_encoder import (ContextEncoderViews, InpaintingDecoder, RegionDiscriminator,
                                                  adversarial_losses, collate_context_encoder, crop_regions,
                                                  reconstruction_loss, tokens_to_map)


def test_central_region_is_blanked_and_the_rest_kept():
    views = ContextEncoderViews(crop_size=16, region_fraction=0.5, crop_scale=(1.0, 1.0), mean=(0, 0, 0),
                                std=(1, 1, 1), flip=False)
    img = torch.randint(1, 256, (3, 16, 16), dtype=torch.uint8)
    s = views(img, np.random.default_rng(0))
    assert s["box"].tolist() == [4, 4, 8, 8]
    expected_mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    expected_mask[:, 4:12, 4:12] = True
    assert torch.equal(s["mask"], expected_mask)
    torch.testing.assert_close(s["target"], img.float() / 255)
    assert bool((s["image"][:, 4:12, 4:12] == 0).all())
    outside = ~expected_mask.expand(3, -1, -1)
    torch.testing.assert_close(s["image"][outside], s["target"][outside])


def test_random_block_stays_inside_and_moves_with_the_seed():
    views = ContextEncoderViews(crop_size=20, region_fraction=0.3, region="random_block")
    img = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    boxes = set()
    for seed in range(20):
        s = views(img, np.random.default_rng(seed))
        top, left, h, w = s["box"].tolist()
        assert h == w == 6 and 0 <= top <= 14 and 0 <= left <= 14
        assert int(s["mask"].sum()) == 36 and bool(s["mask"][0, top:top + 6, left:left + 6].all())
        boxes.add((top, left))
    assert len(boxes) > 5
    again = views(img, np.random.default_rng(3))
    assert again["box"].tolist() == views(img, np.random.default_rng(3))["box"].tolist()


def test_reconstruction_loss_is_the_mean_square_on_the_region():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[0, :, 2:6, 2:6] = True
    mask[1, :, 0:4, 4:8] = True
    sq = [(pred[i, c, y, x] - target[i, c, y, x]) ** 2 for i in range(2) for c in range(3) for y in range(8)
          for x in range(8) if mask[i, 0, y, x]]
    torch.testing.assert_close(reconstruction_loss(pred, target, mask), torch.stack(sq).mean())
    # what lies outside the region does not count
    pred2 = pred.clone()
    pred2[~mask.expand_as(pred)] = 100.0
    torch.testing.assert_close(reconstruction_loss(pred2, target, mask), reconstruction_loss(pred, target, mask))
    with pytest.raises(DinoflowError, match="no pixel"):
        reconstruction_loss(pred, target, torch.zeros_like(mask))


@pytest.mark.parametrize("grid,size", [(1, 28), (2, 28), (2, 32), (7, 112), (4, 16)])
def test_decoder_reaches_the_image_size(grid, size):
    dec = InpaintingDecoder(in_dim=8, grid=grid, out_size=size, hidden_dim=32)
    assert dec(torch.randn(2, 8, grid, grid)).shape == (2, 3, size, size)
    with pytest.raises(DinoflowError, match="features"):
        dec(torch.randn(2, 8, grid + 1, grid + 1))


def test_tokens_to_map_is_row_major():
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)
    fmap = tokens_to_map(tokens, (2, 3))
    assert fmap.shape == (2, 3, 2, 3)
    torch.testing.assert_close(fmap[1, :, 1, 2], tokens[1, 5])


def test_adversarial_losses_formula_and_gradient_split():
    torch.manual_seed(0)
    disc = RegionDiscriminator(region_side=8, width=4)
    generator = torch.nn.Conv2d(3, 3, 1)
    real = torch.randn(4, 3, 8, 8)
    fake = generator(torch.randn(4, 3, 8, 8))
    g_loss, d_loss = adversarial_losses(disc, real, fake)
    with torch.no_grad():
        d_real, d_fake = disc(real), disc(fake)
    torch.testing.assert_close(g_loss, -F.logsigmoid(d_fake).mean())
    torch.testing.assert_close(d_loss, -F.logsigmoid(d_real).mean() - F.logsigmoid(-d_fake).mean())
    g_loss.backward(retain_graph=True)
    assert all(p.grad is None for p in disc.parameters())           # G's loss does not train D
    assert generator.weight.grad is not None
    generator.zero_grad()
    d_loss.backward()
    assert generator.weight.grad is None or float(generator.weight.grad.abs().sum()) == 0.0  # D's loss leaves G
    assert all(p.grad is not None for p in disc.parameters())


def test_crop_regions_and_collate():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    boxes = torch.tensor([[0, 0, 2, 2], [3, 4, 2, 2]])
    r = crop_regions(x, boxes)
    torch.testing.assert_close(r[1], x[1, :, 3:5, 4:6])
    with pytest.raises(DinoflowError, match="different sizes"):
        crop_regions(x, torch.tensor([[0, 0, 2, 2], [0, 0, 3, 3]]))
    views = ContextEncoderViews(crop_size=8)
    img = torch.randint(0, 256, (3, 10, 10), dtype=torch.uint8)
    batch = collate_context_encoder([views(img, np.random.default_rng(i)) for i in range(3)])
    assert batch["image"].shape == (3, 3, 8, 8) and batch["mask"].shape == (3, 1, 8, 8)
