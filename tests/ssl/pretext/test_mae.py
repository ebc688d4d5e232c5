"""MAE: the per-sample masks (lightly's random_token_mask, seeded), the normalised-pixel loss against the MAE
reference formula, masked targets, and the visible-only encoder against the full encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinoflow.errors import DinoflowError
from dinoflow.models.encoder import Encoder
from dinoflow.ssl.pretext.mae import (MAEDecoder, MAEViews, VisibleEncoder, collate_mae, mae_loss,
                                      masked_patch_targets, num_visible, to_sequence_index)

lightly_utils = pytest.importorskip("lightly.models.utils")


def test_masks_partition_the_patches_with_the_paper_count():
    views = MAEViews(crop_size=28, patch_size=7, mask_ratio=0.75)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    keeps = set()
    for seed in range(10):
        s = views(img, np.random.default_rng(seed))
        assert s["idx_keep"].shape == (4,) and s["idx_mask"].shape == (12,)  # int(16 * 0.25) visible
        assert sorted(s["idx_keep"].tolist() + s["idx_mask"].tolist()) == list(range(16))
        keeps.add(tuple(sorted(s["idx_keep"].tolist())))
    assert len(keeps) > 5
    assert num_visible(64, 0.75) == 16 and num_visible(49, 0.75) == 12 and num_visible(4, 0.9) == 1


def test_masks_are_seeded_only_by_the_sample_generator():
    views = MAEViews(crop_size=28, patch_size=7)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    a = views(img, np.random.default_rng(7))
    torch.rand(100)  # the global generator moves on ...
    b = views(img, np.random.default_rng(7))
    for k in a:
        torch.testing.assert_close(a[k], b[k])  # ... and the sample does not change
    # the mask is lightly's random_token_mask run under the seed drawn from the sample's generator
    seed = int(np.random.default_rng(7).integers(2**63 - 1))
    torch.manual_seed(seed)
    keep, mask = lightly_utils.random_token_mask((1, 16), mask_ratio=0.75, mask_class_token=True)
    k, m = views.sample_mask(np.random.default_rng(7))
    torch.testing.assert_close(k, keep[0])
    torch.testing.assert_close(m, mask[0])


def _reference_mae_loss(imgs, pred_full, mask, p):
    """facebookresearch/mae ``forward_loss`` (norm_pix_loss=True), written out: pred over all patches, mask 1 =
    removed."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    target = (x - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred_full - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def test_loss_equals_the_mae_reference_formula():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(3, 3, 16, 16, generator=g)
    p, n = 4, 16
    pred_full = torch.randn(3, n, p * p * 3, generator=g)
    views = MAEViews(crop_size=16, patch_size=p)
    idx_mask = torch.stack([views.sample_mask(np.random.default_rng(i))[1] for i in range(3)])
    mask = torch.zeros(3, n)
    mask.scatter_(1, idx_mask, 1.0)
    ours = mae_loss(lightly_utils.get_at_index(pred_full, idx_mask), masked_patch_targets(imgs, p, idx_mask))
    torch.testing.assert_close(ours, _reference_mae_loss(imgs, pred_full, mask, p))
    raw = mae_loss(torch.zeros(3, 12, 48), torch.ones(3, 12, 48), norm_pix_loss=False)
    assert float(raw) == 1.0


def test_masked_targets_are_the_pixels_of_those_patches():
    imgs = torch.randn(2, 3, 8, 8)
    idx = torch.tensor([[3, 0], [1, 2]])  # 2x2 grid of 4-pixel patches
    t = masked_patch_targets(imgs, 4, idx)
    # patch 3 of image 0 = bottom-right 4x4 block, flattened (row, col, channel) as lightly's patchify
    torch.testing.assert_close(t[0, 0], imgs[0, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(t[1, 0], imgs[1, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))


def _vit(arch: str = "vit_small_patch14_dinov2") -> Encoder:
    torch.manual_seed(0)
    return Encoder(arch, 28, {"embed_dim": 32, "depth": 2, "num_heads": 2})


def test_visible_encoder_with_register_tokens():
    enc = _vit("vit_small_patch14_reg4_dinov2").eval()
    assert enc.num_prefix_tokens == 5  # class token + 4 registers
    x = torch.randn(2, 3, 28, 28)
    keep = to_sequence_index(torch.tensor([[3, 1], [0, 2]]), 5, with_prefix=True)
    assert keep.tolist() == [[0, 1, 2, 3, 4, 8, 6], [0, 1, 2, 3, 4, 5, 7]]
    all_patches = to_sequence_index(torch.arange(4).expand(2, -1), 5, with_prefix=True)
    full = VisibleEncoder(enc.model)(x, all_patches)
    torch.testing.assert_close(full[:, 5:], enc.forward_tokens(x)["patch"])
    m = enc.model
    tok = lightly_utils.get_at_index(m._pos_embed(m.patch_embed(x)), keep)  # timm order: cls, registers, patches
    torch.testing.assert_close(VisibleEncoder(m)(x, keep), m.norm(m.blocks(tok)))


def test_visible_encoder_equals_the_backbone_when_nothing_is_hidden_and_adds_no_parameters():
    enc = _vit().eval()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    visible = VisibleEncoder(enc.model)
    for k, v in enc.state_dict().items():  # lightly's wrapper did not re-initialise the weights
        torch.testing.assert_close(v, before[k])
    x = torch.randn(2, 3, 28, 28)
    keep = to_sequence_index(torch.arange(4).expand(2, -1), enc.num_prefix_tokens, with_prefix=True)
    out = visible(x, keep)
    ref = enc.forward_tokens(x)
    torch.testing.assert_close(out[:, 0], ref["cls"])
    torch.testing.assert_close(out[:, 1:], ref["patch"])
    # a subset of patches: the same tokens as running the ViT on that subset by hand
    keep = to_sequence_index(torch.tensor([[2, 0], [3, 1]]), 1, with_prefix=True)
    assert keep.tolist() == [[0, 3, 1], [0, 4, 2]]
    m = enc.model
    tok = m._pos_embed(m.patch_embed(x))
    tok = lightly_utils.get_at_index(tok, keep)
    torch.testing.assert_close(visible(x, keep), m.norm(m.blocks(tok)))


def test_decoder_predicts_every_masked_patch():
    dec = MAEDecoder(embed_dim=32, n_patches=4, patch_size=14, num_prefix_tokens=1, decoder_dim=16,
                     decoder_depth=1, decoder_num_heads=2)
    encoded = torch.randn(2, 2, 32)
    keep = torch.tensor([[0, 2], [0, 4]])
    hidden = torch.tensor([[1, 3, 4], [1, 2, 3]])
    assert dec(encoded, keep, hidden).shape == (2, 3, 14 * 14 * 3)
    with pytest.raises(DinoflowError, match="divisible"):
        MAEDecoder(32, 4, 14, 1, decoder_dim=10, decoder_num_heads=4)


def test_bad_parameters_and_collate():
    with pytest.raises(DinoflowError, match="multiple of the ViT patch size"):
        MAEViews(crop_size=30, patch_size=14)
    with pytest.raises(DinoflowError, match="mask_ratio"):
        MAEViews(crop_size=28, patch_size=14, mask_ratio=1.0)
    views = MAEViews(crop_size=28, patch_size=14)
    img = torch.randint(0, 256, (3, 30, 30), dtype=torch.uint8)
    batch = collate_mae([views(img, np.random.default_rng(i)) for i in range(3)])
    assert batch["image"].shape == (3, 3, 28, 28) and batch["idx_keep"].shape == (3, 1)
