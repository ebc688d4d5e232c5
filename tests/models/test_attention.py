"""CLS attention recomputed next to timm's fused attention equals timm's explicit (unfused) attention."""

from __future__ import annotations

import pytest
import torch

from _model_helpers import VIT, VIT_REG, images, tiny_vit
from dinoflow.errors import DinoflowError
from dinoflow.models.attention import cls_attention, feature_saliency, heads_to_grid
from dinoflow.models.encoder import Encoder


def explicit_attention(enc: Encoder, x: torch.Tensor) -> torch.Tensor:
    """Full (B, heads, T, T) attention of the last block from timm's unfused code path (attn_drop's input)."""
    attn = enc.model.blocks[-1].attn
    grabbed = []
    handle = attn.attn_drop.register_forward_hook(lambda _m, inp, _out: grabbed.append(inp[0]))
    attn.fused_attn = False
    try:
        with torch.no_grad():
            enc.forward_tokens(x)
    finally:
        attn.fused_attn = True
        handle.remove()
    return grabbed[0]


@pytest.mark.parametrize("arch", [VIT, VIT_REG])
def test_cls_attention_equals_explicit_computation(arch):
    enc, x = tiny_vit(arch), images()
    assert enc.model.blocks[-1].attn.fused_attn  # the default path under test is the fused one
    ours = cls_attention(enc, x)
    full = explicit_attention(enc, x)
    assert ours.shape == (3, 2, 4)
    torch.testing.assert_close(ours, full[:, :, 0, enc.num_prefix_tokens:], rtol=1e-5, atol=1e-6)
    # rows over all tokens sum to one, so the patch part sums to one minus the prefix-token share
    torch.testing.assert_close(ours.sum(-1), 1 - full[:, :, 0, :enc.num_prefix_tokens].sum(-1))
    assert heads_to_grid(ours, enc, 28, 28).shape == (3, 2, 2, 2)


def test_feature_saliency():
    torch.manual_seed(0)
    cnn = Encoder("tf_efficientnet_lite0", 64).eval()
    x = images(2, size=64)
    sal = feature_saliency(cnn, x)
    fmap = cnn.forward_features(x)
    assert sal.shape == (2, 2, 2)
    torch.testing.assert_close(sal[1, 0, 1], fmap[1, :, 0, 1].square().sum().sqrt())
    with pytest.raises(DinoflowError, match="CNN"):
        cls_attention(cnn, x)
    vit, xv = tiny_vit(), images()
    sal = feature_saliency(vit, xv)
    torch.testing.assert_close(sal.reshape(3, -1), vit.forward_tokens(xv)["patch"].norm(dim=-1))
