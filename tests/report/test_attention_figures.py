"""Attention figures: maps of a tiny ViT (against the explicit softmax attention) and a tiny CNN (saliency)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinoflow import paths
from dinoflow.config import model_names
from dinoflow.errors import DinoflowError
from dinoflow.models.encoder import Encoder
from dinoflow.report.attention import (SALIENCY_TITLE, attention_figure, attention_query_ids, model_input,
                                       model_maps, normalise, upsample)
from dinoflow.report.figures import model_row_title
from dinoflow.report.grids import query_file_name
from dinoflow.utils import read_json
from report_fixtures import chdir


@pytest.fixture(scope="module")
def tiny_vit() -> Encoder:
    torch.manual_seed(0)
    return Encoder("vit_small_patch14_dinov2", img_size=28,
                   timm_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2}).eval()


@pytest.fixture(scope="module")
def tiny_cnn() -> Encoder:
    torch.manual_seed(0)
    return Encoder("resnet10t", img_size=64).eval()


@pytest.fixture
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))


def test_upsample_is_bilinear_half_pixel():
    # align_corners=False: output pixel x samples the source at (x + 0.5) / 2 - 0.5, clamped to [0, 1].
    src = np.array([[[0.0, 1.0], [2.0, 3.0]]])
    t = np.array([0.0, 0.25, 0.75, 1.0])
    expected = 2 * t[:, None] + t[None, :]
    np.testing.assert_allclose(upsample(src, (4, 4))[0], expected, atol=1e-6)


def test_normalise_range_and_flat_maps():
    m = np.array([[2.0, 4.0], [3.0, 6.0]])
    np.testing.assert_allclose(normalise(m), [[0, 0.5], [0.25, 1]])
    assert normalise(np.full((3, 3), 7.0)) is None
    assert normalise(np.full((3, 3), 7.0) + np.array([0, 1e-9, 0])) is None  # rounding noise is flat too


def _explicit_cls_attention(encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
    """Reference: timm's non-fused path materialises softmax(q k^T); grab it at the attention dropout."""
    attn = encoder.model.blocks[-1].attn
    captured = []
    old = attn.fused_attn
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0]))
    try:
        with torch.no_grad():
            encoder.forward_tokens(x)
    finally:
        handle.remove()
        attn.fused_attn = old
    return captured[-1][:, :, 0, encoder.num_prefix_tokens:]


def test_vit_maps_equal_explicit_attention(tiny_vit, image):
    assert tiny_vit.model.blocks[-1].attn.fused_attn  # the maps below come from the fused (SDPA) path
    x = model_input(image, tiny_vit)
    assert x.shape == (1, 3, 28, 28)
    res = model_maps(tiny_vit, x, (64, 64))
    assert res["kind"] == "attention"
    assert res["titles"] == ["head 1", "head 2", "mean of heads"]
    ref = _explicit_cls_attention(tiny_vit, x)[0].reshape(2, 2, 2).numpy()  # 28 px / 14 = 2x2 patches
    ref = np.concatenate([ref, ref.mean(axis=0, keepdims=True)])
    expected = torch.nn.functional.interpolate(torch.from_numpy(ref)[None], size=(64, 64), mode="bilinear",
                                               align_corners=False)[0].numpy()
    np.testing.assert_allclose(res["maps"], expected, rtol=1e-4, atol=1e-6)


def test_cnn_maps_are_feature_norm_saliency(tiny_cnn, image):
    x = model_input(image, tiny_cnn)
    res = model_maps(tiny_cnn, x, (64, 64))
    assert res["kind"] == "saliency" and res["titles"] == [SALIENCY_TITLE]
    with torch.no_grad():
        feats = tiny_cnn.model.forward_features(x)[0]  # (C, h, w)
    norm = torch.sqrt((feats ** 2).sum(dim=0)).numpy()
    expected = upsample(norm[None], (64, 64))
    np.testing.assert_allclose(res["maps"], expected, rtol=1e-4, atol=1e-6)


def test_attention_figure_rows_and_labels(tiny_vit, tiny_cnn, image):
    rows = [("vit", model_maps(tiny_vit, model_input(image, tiny_vit), (64, 64))),
            (model_row_title("cnn", {"stand_in": True, "stand_in_label": "ImageNet stand-in"}),
             model_maps(tiny_cnn, model_input(image, tiny_cnn), (64, 64)))]
    fig = attention_figure("q1", image, "a $red$ <circle>", rows)
    axes = np.array(fig.axes).reshape(2, 4)
    assert [a.get_title() for a in axes[0]] == ["image", "head 1", "head 2", "mean of heads"]
    assert axes[1, 1].get_title().replace("\n", " ").startswith("saliency (feature L2 norm), not attention")
    assert not axes[1, 2].get_visible() and not axes[1, 3].get_visible()
    assert "ImageNet stand-in" in axes[1, 0].get_ylabel()
    assert len(axes[0, 1].images) == 2  # the image and the overlaid map
    fig.canvas.draw()


def test_attention_query_ids_order_and_validation():
    ok = ["a", "b", "c", "d"]
    assert attention_query_ids(["b", "a"], ["d", "b"], ok) == ["b", "a", "d"]
    with pytest.raises(DinoflowError, match=r"attention\.query_ids.*'zz'"):
        attention_query_ids(["a"], ["zz"], ok)


def test_attention_stage_outputs(report_ws):
    ws, params = report_ws
    with chdir(ws):
        grid = read_json(f"{paths.GRIDS_DIR}/queries.json")
        att = read_json(f"{paths.ATTENTION_DIR}/queries.json")
        assert att["query_ids"] == grid["query_ids"]  # same queries as the grids (no extra ids configured)
        assert att["models"] == model_names(params)
        assert att["files"] == [query_file_name(i, q) for i, q in enumerate(att["query_ids"])]
        for name in att["files"]:
            with Image.open(f"{paths.ATTENTION_DIR}/{name}") as im:
                assert im.width > 300 and im.height > 150 * len(att["models"])
