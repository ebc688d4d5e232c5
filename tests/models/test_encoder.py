"""Encoder: token outputs against timm's own forward and a Hugging Face DINOv2 reference, masks, freezing."""

from __future__ import annotations

import pytest
import torch

from _model_helpers import IMG, TINY, VIT, VIT_REG, images, tiny_vit
from dinoflow.errors import DinoflowError
from dinoflow.models.encoder import Encoder


def test_forward_tokens_equals_timm_forward_features():
    enc, x = tiny_vit(), images()
    ref = enc.model.forward_features(x)  # timm: (B, 1 + N, D) after the final norm
    out = enc.forward_tokens(x)
    torch.testing.assert_close(out["cls"], ref[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out["patch"], ref[:, 1:], rtol=0, atol=0)
    assert out["patch"].shape == (3, (IMG // 14) ** 2, 32)
    emb = enc.embed(x)
    torch.testing.assert_close(emb["patch_mean"], ref[:, 1:].mean(1))
    assert enc.is_vit and enc.embed_dim == 32 and enc.patch_size == 14


def test_register_tokens_are_not_patches():
    enc, x = tiny_vit(VIT_REG), images()
    ref = enc.model.forward_features(x)  # cls, 4 registers, patches
    out = enc.forward_tokens(x)
    assert enc.num_prefix_tokens == 5
    torch.testing.assert_close(out["patch"], ref[:, 5:], rtol=0, atol=0)
    torch.testing.assert_close(out["cls"], ref[:, 0], rtol=0, atol=0)


def _manual_masked_forward(enc: Encoder, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """DINOv2's prepare_tokens_with_masks written out: patchify, swap masked rows, cat cls, add pos, blocks."""
    m = enc.model
    tok = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tok = torch.where(masks.reshape(x.shape[0], -1, 1), enc.mask_token.reshape(1, 1, -1), tok)
    tok = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), tok], dim=1) + m.pos_embed
    for blk in m.blocks:
        tok = tok + blk.ls1(blk.attn(blk.norm1(tok)))
        tok = tok + blk.ls2(blk.mlp(blk.norm2(tok)))
    return m.norm(tok)


def test_masked_tokens_match_manual_computation():
    enc, x = tiny_vit(), images()
    masks = torch.tensor([[True, False, False, True], [False] * 4, [True] * 4])
    ref = _manual_masked_forward(enc, x, masks)
    out = enc.forward_tokens(x, masks=masks.reshape(3, 2, 2))  # (B, h, w) is accepted too
    torch.testing.assert_close(out["cls"], ref[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["patch"], ref[:, 1:], rtol=1e-5, atol=1e-5)
    # the unmasked image is unaffected, and masking changes the others
    torch.testing.assert_close(out["cls"][1], enc.forward_tokens(x)["cls"][1], rtol=0, atol=0)
    assert not torch.allclose(out["cls"][0], enc.forward_tokens(x)["cls"][0])


def test_masked_tokens_match_huggingface_dinov2():
    """Independent reference: transformers' Dinov2Model with bool_masked_pos (mask token before pos embed)."""
    transformers = pytest.importorskip("transformers")
    from dinoflow.models.weights import load_into_encoder

    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=128, patch_size=14, image_size=IMG, layerscale_value=0.5)
    hf = transformers.Dinov2Model(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    enc = Encoder(VIT, IMG, {**TINY, "depth": 2}).eval()
    load_into_encoder(enc, hf.state_dict(), "hf-model")
    x = images()
    masks = torch.tensor([[True, False, True, False], [False] * 4, [False, False, False, True]])
    with torch.no_grad():
        ref = hf(pixel_values=x, bool_masked_pos=masks).last_hidden_state
        out = enc.forward_tokens(x, masks=masks)
    torch.testing.assert_close(out["cls"], ref[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["patch"], ref[:, 1:], rtol=1e-4, atol=1e-4)


def test_dynamic_img_size_and_masks():
    torch.manual_seed(0)
    enc = Encoder(VIT, IMG, {**TINY, "depth": 1, "dynamic_img_size": True}).eval()
    x = images(2, size=42)  # 3 x 3 patches, not the 2 x 2 it was built for
    masks = torch.zeros(2, 9, dtype=torch.bool)
    out = enc.forward_tokens(x, masks=masks)
    assert out["patch"].shape == (2, 9, 32)
    torch.testing.assert_close(out["patch"], enc.model.forward_features(x)[:, 1:], rtol=0, atol=0)
    with pytest.raises(DinoflowError, match="masks"):
        enc.forward_tokens(x, masks=torch.zeros(2, 4, dtype=torch.bool))


def test_cnn_tokens_are_pooled_feature_map():
    torch.manual_seed(0)
    enc = Encoder("tf_efficientnet_lite0", 64).eval()
    x = images(2, size=64)
    fmap = enc.forward_features(x)
    out = enc.forward_tokens(x)
    torch.testing.assert_close(out["cls"], enc.model(x))  # timm's own global pool (num_classes=0)
    assert out["patch"].shape == (2, fmap.shape[2] * fmap.shape[3], 1280)
    torch.testing.assert_close(out["patch"][:, 0], fmap[:, :, 0, 0])
    assert not enc.is_vit and enc.patch_size is None and enc.embed_dim == 1280
    assert enc.data_config["input_size"] == (3, 64, 64)
    with pytest.raises(DinoflowError, match="ViT"):
        enc.forward_tokens(x, masks=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(DinoflowError, match="ViTs only"):
        enc.get_intermediate_layers(x)


def test_get_intermediate_layers_passthrough():
    enc, x = tiny_vit(), images()
    layers = enc.get_intermediate_layers(x, 2, norm=True)
    assert len(layers) == 2 and layers[-1].shape == (3, 4, 32)
    torch.testing.assert_close(layers[-1], enc.forward_tokens(x)["patch"])


def _grads_after_backward(enc: Encoder, x: torch.Tensor, masks=None) -> set[str]:
    enc.zero_grad(set_to_none=True)
    out = enc.forward_tokens(x, masks=masks)
    (out["cls"].square().sum() + out["patch"].square().sum()).backward()
    return {n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("spec, blocks", [("last1", [3]), ("last3", [1, 2, 3])])
def test_vit_freezing_exactly_last_blocks_and_norm(spec, blocks):
    enc, x = tiny_vit(depth=4), images()
    enc.train()
    names = enc.set_trainable(spec)
    expected = {n for n, _ in enc.named_parameters()
                if any(n.startswith(f"model.blocks.{b}.") for b in blocks) or n.startswith("model.norm.")}
    assert set(names) == expected
    assert _grads_after_backward(enc, x) == expected


def test_vit_freezing_none_and_all():
    enc, x = tiny_vit(depth=2), images()
    assert enc.set_trainable("none") == []
    assert not any(p.requires_grad for p in enc.parameters())
    everything = {n for n, _ in enc.named_parameters()}
    assert set(enc.set_trainable("all")) == everything
    # the mask token only receives gradient when some patch is masked
    masks = torch.zeros(3, 4, dtype=torch.bool)
    masks[0, 1] = True
    assert _grads_after_backward(enc, x, masks) == everything
    for bad in ("last0", "last5", "first2", "some"):
        with pytest.raises(DinoflowError, match="trainable"):
            enc.set_trainable(bad)


@pytest.mark.parametrize("spec, blocks", [("last1", ["6.0"]), ("last3", ["5.2", "5.3", "6.0"])])
def test_efficientnet_last_k_means_k_blocks(spec, blocks):
    """timm's fine-grained grouping: lastK = the last K inverted-residual blocks (not stages), plus the final
    1x1 conv and its BatchNorm, which timm groups with the last block."""
    torch.manual_seed(0)
    enc = Encoder("tf_efficientnet_lite0", 64).train()
    names = enc.set_trainable(spec)
    expected = {n for n, _ in enc.named_parameters()
                if n.startswith(tuple(f"model.blocks.{b}." for b in blocks) + ("model.conv_head.", "model.bn2."))}
    assert set(names) == expected
    assert _grads_after_backward(enc, images(2, size=64)) == expected
    counts = enc.parameter_counts()
    params = dict(enc.named_parameters())
    assert counts["trainable_params"] == sum(params[n].numel() for n in expected)
    assert counts["total_params"] == sum(p.numel() for p in params.values())
    assert 0 < counts["trainable_share"] < 0.7  # lite0: last1 ~ 0.8 M, last3 ~ 1.8 M of 3.4 M


def test_vit_parameter_counts_follow_trainable():
    enc = tiny_vit(depth=4)
    total = sum(p.numel() for p in enc.parameters())
    enc.set_trainable("none")
    assert enc.parameter_counts() == {"trainable_params": 0, "total_params": total, "trainable_share": 0.0}
    enc.set_trainable("last1")
    block = sum(p.numel() for n, p in enc.named_parameters() if n.startswith(("model.blocks.3.", "model.norm.")))
    assert enc.parameter_counts()["trainable_params"] == block


def test_frozen_batchnorm_keeps_running_statistics():
    torch.manual_seed(0)
    enc = Encoder("tf_efficientnet_lite0", 64)
    enc.set_trainable("last1")
    enc.train()
    frozen_bn, trained_bn = enc.model.bn1, enc.model.bn2  # stem BN (frozen), final BN (trainable)
    before = frozen_bn.running_mean.clone(), trained_bn.running_mean.clone()
    enc.forward_tokens(images(2, size=64) * 3 + 1)
    assert not frozen_bn.training and trained_bn.training
    assert torch.equal(frozen_bn.running_mean, before[0])
    assert not torch.equal(trained_bn.running_mean, before[1])
    enc.set_trainable("all")
    assert frozen_bn.training


def test_grad_checkpointing_same_outputs_and_grads():
    enc, x = tiny_vit(depth=2), images()
    enc.set_trainable("all")
    ref = enc.forward_tokens(x)["cls"]
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad(set_to_none=True)
    enc.set_grad_checkpointing(True)
    out = enc.forward_tokens(x)["cls"]
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, g in ref_grads.items():
        torch.testing.assert_close(dict(enc.named_parameters())[n].grad, g)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(DinoflowError, match="no_such_net"):
        Encoder("no_such_net")


def test_frozen_evonorm_b_layers_keep_running_statistics_too():
    """timm's EvoNorm2dB0 divides by the batch variance in training and keeps a running variance: a frozen one
    is a frozen normalisation layer like BatchNorm (Encoder.train keeps it in eval mode)."""
    from timm.layers import EvoNorm2dB0

    from dinoflow.models.encoder import has_running_statistics

    torch.manual_seed(0)
    enc = Encoder("resnet18", 64, {"norm_layer": EvoNorm2dB0})
    evo = [m for m in enc.modules() if isinstance(m, EvoNorm2dB0)]
    assert evo and all(has_running_statistics(m) for m in evo)
    assert not has_running_statistics(torch.nn.LayerNorm(4)) and not has_running_statistics(torch.nn.InstanceNorm2d(4))
    enc.set_trainable("last1")
    enc.train()
    frozen = [m for m in evo if not any(p.requires_grad for p in m.parameters())]
    trained = [m for m in evo if any(p.requires_grad for p in m.parameters())]
    assert frozen and trained
    before = [m.running_var.clone() for m in frozen]
    enc.forward_tokens(images(2, size=64) * 3 + 1)
    assert not any(m.training for m in frozen) and all(m.training for m in trained)
    assert all(torch.equal(m.running_var, b) for m, b in zip(frozen, before))
