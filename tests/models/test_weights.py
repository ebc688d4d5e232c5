"""Weight loaders: tiny checkpoints written in Meta, Hugging Face and timm key formats; checksums; hub; package."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from _model_helpers import IMG, TINY, VIT, VIT_REG, images, tiny_vit
from dinoflow.errors import DinoflowError
from dinoflow.models import weights as W
from dinoflow.models.encoder import Encoder


def meta_state_dict(enc: Encoder, grid: int | None = None) -> dict[str, torch.Tensor]:
    """`enc` in facebookresearch/dinov2 key names: blocks.i.ls1.gamma, mask_token, pos_embed with the cls slot
    (and register_tokens); with `grid`, pos_embed for a grid x grid image as Meta ships it for 518 px (37 x 37)."""
    sd = {k.removeprefix("model."): v.clone() for k, v in enc.state_dict().items()}
    if "reg_token" in sd:  # Meta: registers apart, pos_embed covers cls + patches, cls not pre-added
        reg, pos = sd.pop("reg_token"), sd["pos_embed"]
        cls_pos = torch.randn(1, 1, pos.shape[-1])
        sd["register_tokens"] = reg
        sd["pos_embed"] = torch.cat([cls_pos, pos], dim=1)
        sd["cls_token"] = sd["cls_token"] - cls_pos
    if grid is not None:
        sd["pos_embed"] = torch.randn(1, 1 + grid * grid, sd["pos_embed"].shape[-1])
    sd["mask_token"] = sd.pop("mask_token").reshape(1, -1)
    return sd


def assert_same_weights(a: Encoder, b: Encoder, skip: tuple[str, ...] = ()):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if k not in skip:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_meta_format_maps_every_tensor(tmp_path: Path):
    src = tiny_vit()
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    sd = meta_state_dict(src)
    assert {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "blocks.0.norm1.weight",
            "blocks.0.attn.qkv.weight", "blocks.0.ls1.gamma", "blocks.0.mlp.fc1.weight", "norm.weight"} <= set(sd)
    torch.save(sd, path)
    dst = Encoder(VIT, IMG, TINY)
    assert W.detect_format(W.read_state_dict(path)) == "meta"
    source = W.load_pretrained(dst, {"source": "file", "file": str(path)})
    assert "meta format" in source
    assert_same_weights(src, dst)
    torch.testing.assert_close(dst.forward_tokens(images())["cls"], src.forward_tokens(images())["cls"])


def test_meta_registers_convert_to_timm_layout(tmp_path: Path):
    src = tiny_vit(VIT_REG)
    sd = meta_state_dict(src)
    path = tmp_path / "dinov2_tiny_reg4_pretrain.pth"
    torch.save(sd, path)
    dst = Encoder(VIT_REG, IMG, TINY)
    W.load_pretrained(dst, {"source": "file", "file": str(path)})
    # Meta's cls_token + pos_embed[:, 0] folds back into timm's cls_token (equal up to float rounding)
    assert_same_weights(src, dst, skip=("model.cls_token",))
    torch.testing.assert_close(dst.model.cls_token, src.model.cls_token)


def test_meta_pos_embed_resampled_to_model_grid(tmp_path: Path):
    """Meta ships pos_embed for 518 px (37 x 37); here a 5 x 5 grid goes onto the 2 x 2 model grid."""
    src = tiny_vit()
    sd = meta_state_dict(src, grid=5)
    path = tmp_path / "tiny.pth"
    torch.save(sd, path)
    dst = Encoder(VIT, IMG, TINY)
    W.load_pretrained(dst, {"source": "file", "file": str(path)})
    expected = resample_abs_pos_embed(sd["pos_embed"], new_size=(2, 2), old_size=(5, 5), num_prefix_tokens=1)
    torch.testing.assert_close(dst.model.pos_embed, expected)
    assert_same_weights(src, dst, skip=("model.pos_embed",))


def test_huggingface_format_maps_every_tensor(tmp_path: Path):
    """A checkpoint written by transformers' own Dinov2Model.save_pretrained (published key names)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=128, patch_size=14, image_size=IMG)
    hf = transformers.Dinov2Model(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    raw = W.read_state_dict(path)
    assert "encoder.layer.0.attention.attention.query.weight" in raw and "embeddings.position_embeddings" in raw
    dst = Encoder(VIT, IMG, {**TINY, "depth": 2}).eval()
    assert "hf format" in W.load_pretrained(dst, {"source": "file", "file": str(path)})
    sd = dst.state_dict()
    for i in range(2):
        q, k, v = (raw[f"encoder.layer.{i}.attention.attention.{n}.weight"] for n in ("query", "key", "value"))
        torch.testing.assert_close(sd[f"model.blocks.{i}.attn.qkv.weight"], torch.cat([q, k, v]), rtol=0, atol=0)
        torch.testing.assert_close(sd[f"model.blocks.{i}.ls1.gamma"], raw[f"encoder.layer.{i}.layer_scale1.lambda1"])
        torch.testing.assert_close(sd[f"model.blocks.{i}.attn.proj.bias"],
                                   raw[f"encoder.layer.{i}.attention.output.dense.bias"])
    torch.testing.assert_close(sd["mask_token"], raw["embeddings.mask_token"])
    torch.testing.assert_close(sd["model.norm.weight"], raw["layernorm.weight"])
    # every tensor used: the mapped model computes what the Hugging Face model computes
    with torch.no_grad():
        ref = hf(pixel_values=images()).last_hidden_state
    torch.testing.assert_close(dst.forward_tokens(images())["patch"], ref[:, 1:], rtol=1e-4, atol=1e-4)


def test_hf_unknown_key_is_an_error():
    sd = {"embeddings.cls_token": torch.zeros(1, 1, 4), "encoder.layer.0.attention.rope.freqs": torch.zeros(2)}
    with pytest.raises(DinoflowError, match="rope"):
        W.hf_to_meta(sd)


def test_timm_format_and_classifier_is_dropped(tmp_path: Path):
    src = tiny_vit()
    sd = {k.removeprefix("model."): v for k, v in src.state_dict().items() if k != "mask_token"}
    sd["head.weight"], sd["head.bias"] = torch.randn(10, 32), torch.randn(10)
    path = tmp_path / "timm_tiny.safetensors"
    save_file(sd, str(path))
    dst = Encoder(VIT, IMG, TINY)
    assert "timm format" in W.load_pretrained(dst, {"source": "file", "file": str(path)})
    assert_same_weights(src, dst, skip=("mask_token",))
    assert torch.count_nonzero(dst.mask_token) == 0  # no mask token in a timm file: DINOv2's zero init


def test_wrong_architecture_names_the_problem(tmp_path: Path):
    path = tmp_path / "deep.pth"
    torch.save(meta_state_dict(tiny_vit(depth=4)), path)
    with pytest.raises(DinoflowError, match=r"(?s)deep\.pth.*Unexpected.*blocks\.3"):
        W.load_pretrained(Encoder(VIT, IMG, {**TINY, "depth": 2}), {"source": "file", "file": str(path)})


def test_sha256_checks(tmp_path: Path):
    sd = meta_state_dict(tiny_vit())
    known = tmp_path / "dinov2_vits14_pretrain.pth"  # a known name with other content
    torch.save(sd, known)
    with pytest.raises(DinoflowError, match="sha256.*b938bf1b"):
        W.load_pretrained(Encoder(VIT, IMG, TINY), {"source": "file", "file": str(known)})
    hf_known = tmp_path / "models--facebook--dinov2-small" / "snapshots" / "abc" / "model.safetensors"
    hf_known.parent.mkdir(parents=True)
    save_file({"a": torch.zeros(1)}, str(hf_known))
    with pytest.raises(DinoflowError, match="ae1e99fc"):
        W.verify_sha256(hf_known)
    other = tmp_path / "mine.pth"
    torch.save(sd, other)
    import hashlib

    digest = hashlib.sha256(other.read_bytes()).hexdigest()
    assert W.verify_sha256(other) == digest  # unknown name, no expectation: fine
    assert W.verify_sha256(other, digest.upper()) == digest
    with pytest.raises(DinoflowError, match="mine.pth"):
        W.load_pretrained(Encoder(VIT, IMG, TINY), {"source": "file", "file": str(other), "sha256": "0" * 64})


def test_missing_file_and_bad_source(tmp_path: Path):
    with pytest.raises(DinoflowError, match="does not exist"):
        W.load_pretrained(Encoder(VIT, IMG, TINY), {"source": "file", "file": str(tmp_path / "nope.pth")})
    with pytest.raises(DinoflowError, match="pretrained.source"):
        W.load_pretrained(Encoder(VIT, IMG, TINY), {"source": "ftp"})


def test_hub_offline_fails_fast_with_local_file_hint(monkeypatch):
    enc = Encoder(VIT, IMG, TINY)
    spec = {"source": "hub", "hub_name": "timm/vit_small_patch14_dinov2.lvd142m"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DinoflowError, match="pretrained.source: file"):
        W.load_pretrained(enc, spec)
    # no offline flag, but the hub endpoint does not answer (a closed local port stands for no network)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(DinoflowError, match=r"cannot reach 127\.0\.0\.1:9.*pretrained\.file"):
        W.load_pretrained(enc, spec)
    assert time.perf_counter() - start < W.HUB_PROBE_TIMEOUT_S + 1


def test_package_stand_in_maps_every_key():
    raw = torch.load(W.package_weights_path(), map_location="cpu", weights_only=True)
    import timm

    model = timm.create_model(W.PACKAGE_ARCH, pretrained=False, num_classes=1000)
    mapped = W.efficientnet_pytorch_to_timm(raw, model)
    assert len(mapped) == len(raw)  # one timm key per package key
    model.load_state_dict(mapped, strict=True)  # no missing, no unexpected key
    # values equal, spot-checked across both block kinds and the head
    assert torch.equal(model.blocks[0][0].conv_dw.weight, raw["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(model.blocks[1][0].conv_pwl.weight, raw["_blocks.1._project_conv.weight"])
    assert torch.equal(model.blocks[6][0].bn1.running_var, raw["_blocks.15._bn0.running_var"])
    assert torch.equal(model.bn2.weight, raw["_bn1.weight"]) and torch.equal(model.classifier.bias, raw["_fc.bias"])

    enc = Encoder(W.PACKAGE_ARCH, 112)
    W.load_pretrained(enc, {"source": "package"})
    for k, v in enc.model.state_dict().items():
        assert torch.equal(v, mapped[k]), k
    with pytest.raises(DinoflowError, match="tf_efficientnet_lite0"):
        W.load_pretrained(Encoder(VIT, IMG, TINY), {"source": "package"})


def test_package_stand_in_classifies_grace_hopper():
    """Known answer: the classic TF/torchvision example photo of Grace Hopper is a 'military uniform' (652)."""
    import matplotlib
    import timm
    from PIL import Image

    model = timm.create_model(W.PACKAGE_ARCH, pretrained=False, num_classes=1000).eval()
    raw = torch.load(W.package_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(W.efficientnet_pytorch_to_timm(raw, model), strict=True)
    img = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        top5 = model(transform(img)[None]).topk(5).indices[0].tolist()
    assert 652 in top5[:3]
    # the rest are clothing classes: academic gown, mortarboard, suit, bow tie, vestment, Windsor tie
    assert set(top5) <= {652, 400, 667, 834, 457, 887, 906}


def test_hub_transformers_repo_goes_through_the_hf_mapping(monkeypatch, tmp_path: Path):
    """The download itself needs the network; stand in for it with a file in the HF cache layout."""
    import huggingface_hub

    src = tiny_vit(depth=2)
    meta = meta_state_dict(src)
    hf = {"embeddings.cls_token": meta["cls_token"], "embeddings.mask_token": meta["mask_token"],
          "embeddings.position_embeddings": meta["pos_embed"],
          "embeddings.patch_embeddings.projection.weight": meta["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": meta["patch_embed.proj.bias"],
          "layernorm.weight": meta["norm.weight"], "layernorm.bias": meta["norm.bias"]}
    for i in range(2):
        b, L = f"blocks.{i}.", f"encoder.layer.{i}."
        for n, part in zip(("query", "key", "value"), meta[b + "attn.qkv.weight"].chunk(3)):
            hf[L + f"attention.attention.{n}.weight"] = part
        for n, part in zip(("query", "key", "value"), meta[b + "attn.qkv.bias"].chunk(3)):
            hf[L + f"attention.attention.{n}.bias"] = part
        for ours, theirs in [("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
                             ("attn.proj", "attention.output.dense")]:
            hf[L + theirs + ".weight"], hf[L + theirs + ".bias"] = meta[b + ours + ".weight"], meta[b + ours + ".bias"]
        hf[L + "layer_scale1.lambda1"], hf[L + "layer_scale2.lambda1"] = meta[b + "ls1.gamma"], meta[b + "ls2.gamma"]
    path = tmp_path / "models--someone--tiny-dinov2" / "snapshots" / "0" / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_file(hf, str(path))
    monkeypatch.setattr(W, "_hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename: str(path))
    dst = Encoder(VIT, IMG, {**TINY, "depth": 2})
    assert W.load_pretrained(dst, {"source": "hub", "hub_name": "someone/tiny-dinov2"}) == "hub:someone/tiny-dinov2"
    assert_same_weights(src, dst)
