"""Non-finite weights stop at the seam that meets them: every pretrained format, dinoflow's own safetensors when
loaded, and the weights saved at the end of training. Tiny checkpoints in each official key format, written here
with the helpers of test_weights.py, carry a few NaN / inf values (the diverged-run case)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _model_helpers import IMG, TINY, VIT, tiny_vit
from test_weights import meta_state_dict
from dinoflow import paths
from dinoflow.config import load_params
from dinoflow.errors import DinoflowError
from dinoflow.models import weights as W
from dinoflow.models.encoder import Encoder
from dinoflow.models.factory import create_encoder, load_encoder, save_encoder


def poison(t: torch.Tensor, n: int, value: float = float("nan")) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[:n] = value
    return t


def test_meta_pth_with_five_nan_values(tmp_path: Path):
    sd = meta_state_dict(tiny_vit())
    sd["blocks.1.attn.qkv.weight"] = poison(sd["blocks.1.attn.qkv.weight"], 5)
    path = tmp_path / "dinov2_diverged.pth"
    torch.save(sd, path)
    dst = Encoder(VIT, IMG, TINY)
    before = copy.deepcopy(dst.state_dict())
    with pytest.raises(DinoflowError, match=r"dinov2_diverged\.pth: pretrained weights: 1 of \d+ tensors hold "
                                            r"non-finite values: 'blocks\.1\.attn\.qkv\.weight': 5 of 3072 values "
                                            r"are not finite \(5 NaN, 0 infinite\)"):
        W.load_pretrained(dst, {"source": "file", "file": str(path)})
    for k, v in dst.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k


def test_huggingface_safetensors_with_inf(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=128, patch_size=14, image_size=IMG)
    transformers.Dinov2Model(cfg).save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    sd = load_file(str(path))
    key = "encoder.layer.1.attention.attention.value.weight"
    sd[key] = poison(sd[key], 2, float("inf"))
    save_file(sd, str(path))
    with pytest.raises(DinoflowError, match=rf"model\.safetensors: pretrained weights: .*'{key}': 2 of 1024 "
                                            r"values are not finite \(0 NaN, 2 infinite\)"):
        W.load_pretrained(Encoder(VIT, IMG, {**TINY, "depth": 2}), {"source": "file", "file": str(path)})


def test_timm_file_and_timm_hub_model(tmp_path: Path, monkeypatch):
    src = tiny_vit()
    sd = {k.removeprefix("model."): v.clone() for k, v in src.state_dict().items() if k != "mask_token"}
    sd["norm.weight"] = poison(sd["norm.weight"], 32)
    path = tmp_path / "timm.safetensors"
    save_file(sd, str(path))
    with pytest.raises(DinoflowError, match=r"timm\.safetensors: .*'norm\.weight': 32 of 32 values"):
        W.load_pretrained(Encoder(VIT, IMG, TINY), {"source": "file", "file": str(path)})

    import timm

    with torch.no_grad():
        src.model.norm.weight.copy_(poison(src.model.norm.weight, 1))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # set by other tests' offline text models
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(W, "_hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: src.model)  # the download, stood in for
    with pytest.raises(DinoflowError, match=r"hub:vit_small_patch14_dinov2: .*'norm\.weight': 1 of 32"):
        W.load_pretrained(Encoder(VIT, IMG, TINY), {"source": "hub", "hub_name": "vit_small_patch14_dinov2"})


def test_package_stand_in_with_a_nan_buffer(tmp_path: Path, monkeypatch):
    raw = torch.load(W.package_weights_path(), map_location="cpu", weights_only=True)
    raw["_blocks.3._bn1.running_var"] = poison(raw["_blocks.3._bn1.running_var"], 3)  # a buffer, not a parameter
    path = tmp_path / "lite0.pth"
    torch.save(raw, path)
    monkeypatch.setattr(W, "package_weights_path", lambda: path)
    with pytest.raises(DinoflowError, match=r"lite0\.pth: .*'_blocks\.3\._bn1\.running_var': 3 of"):
        W.load_pretrained(Encoder(W.PACKAGE_ARCH, 112), {"source": "package"})


@pytest.fixture
def params(tiny_workspace: Path, monkeypatch) -> dict:
    monkeypatch.chdir(tiny_workspace)
    return load_params("params.yaml")


def test_create_encoder_names_the_model(params, tmp_path: Path):
    sd = meta_state_dict(tiny_vit(depth=2))
    sd["cls_token"] = poison(sd["cls_token"], 1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    params["pretrained"].update(arch=VIT, source="file", file=str(path), img_size=IMG,
                                kwargs={**TINY, "depth": 2}, stand_in=False)
    with pytest.raises(DinoflowError, match=r"^model pretrained: .*bad\.pth: pretrained weights: .*'cls_token'"):
        create_encoder(params, "pretrained")


def test_own_safetensors_checked_when_loaded(params):
    enc, info = create_encoder(params, "random")
    save_encoder(enc, paths.model_weights("random"), info)
    assert load_encoder(params, "random") is not None
    sd = load_file(paths.model_weights("random"))
    sd["model.blocks.0.mlp.fc1.weight"] = poison(sd["model.blocks.0.mlp.fc1.weight"], 5)
    save_file(sd, paths.model_weights("random"))  # as a diverged run without the save check would have left it
    with pytest.raises(DinoflowError, match=r"^model random: models/random/weights\.safetensors: 1 of \d+ "
                                            r"tensors .*'model\.blocks\.0\.mlp\.fc1\.weight': 5 of"):
        load_encoder(params, "random")


def test_save_encoder_refuses_diverged_weights(params):
    enc, info = create_encoder(params, "scratch")
    with torch.no_grad():
        enc.model.blocks[1].attn.proj.weight.view(-1)[:7] = float("nan")
        enc.model.norm.bias.fill_(float("-inf"))
    with pytest.raises(DinoflowError, match=r"^model scratch: weights to be saved to models/scratch/weights"
                                            r"\.safetensors: 2 of \d+ tensors .*7 of .*NaN.*training diverged"):
        save_encoder(enc, paths.model_weights("scratch"), info)
    assert not Path(paths.model_weights("scratch")).exists() and not Path(paths.model_info("scratch")).exists()
