"""The pretext methods on the engine: registry and typed configs, the batch seam carries the right targets, the
step's loss is the formula on the method's own outputs, and a few steps lower it with a ViT and a CNN backbone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinoflow.errors import DinoflowError
from dinoflow.ssl.methods import available_methods, get_method, parse_config
from dinoflow.ssl.methods.base import MethodSetup, StepContext, ViewSettings, build_method
from dinoflow.ssl.pretext.jigsaw import min_hamming_distance
from dinoflow.ssl.pretext.relative_position import NEIGHBOURS
from method_helpers import tiny_encoder, tiny_engine, tiny_images

# Small heads and sizes that fit the tiny 28 px backbones (ViT patch 14).
PRETEXT = {
    "rotation": {"head_hidden_dim": 32},
    "relative_position": {"patch_size": 14, "gap": 4, "jitter": 1, "head_hidden_dim": 32},
    "jigsaw": {"tile_size": 14, "cell_size": 16, "n_permutations": 10, "tile_dim": 16, "head_hidden_dim": 32},
    "context_encoder": {"decoder_dim": 32},
    "mae": {"decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2},
}
CASES = [(m, k) for m in sorted(PRETEXT) for k in ("vit", "cnn") if not (m == "mae" and k == "cnn")]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return tiny_images(tmp_path_factory.mktemp("pretext"), n=16)


def _engine(method, kind, images, **train):
    return tiny_engine(method, kind, images, section=PRETEXT[method], **train)


def _first_batch(engine):
    engine.set_epoch(0)
    return next(iter(engine.loader))


def _ctx():
    return StepContext(step=0, epoch=0, total_steps=1, values={})


def test_registered_with_families_and_default_configs():
    assert set(PRETEXT) <= set(available_methods())
    families = {m: get_method(m).family for m in PRETEXT}
    assert families == {"rotation": "pretext", "relative_position": "pretext", "jigsaw": "pretext",
                        "context_encoder": "pretext", "mae": "masked"}
    for m in PRETEXT:
        parse_config(m, {})  # the defaults are valid
        parse_config(m, PRETEXT[m])
    assert parse_config("mae", {}).mask_ratio == 0.75
    assert parse_config("context_encoder", {}).adversarial_weight == 0.0


@pytest.mark.parametrize("method,section,match", [
    ("rotation", {"rotations_per_image": 5}, "methods.rotation.rotations_per_image"),
    ("relative_position", {"gap": 2, "jitter": 2}, "jitter"),
    ("jigsaw", {"tile_size": 20, "cell_size": 16}, "methods.jigsaw.tile_size"),
    ("jigsaw", {"n_permutations": "many"}, "methods.jigsaw.n_permutations"),
    ("context_encoder", {"region": "ring"}, "methods.context_encoder.region"),
    ("mae", {"mask_ratio": 1.5}, "methods.mae.mask_ratio"),
    ("mae", {"decoder_dim": 10, "decoder_num_heads": 4}, "divisible"),
    ("mae", {"unknown_knob": 1}, "unknown key"),
])
def test_bad_configs_name_the_parameter(method, section, match):
    with pytest.raises(DinoflowError, match=match):
        build_method(method, tiny_encoder("cnn" if method != "mae" else "vit"), section,
                     MethodSetup(views=ViewSettings(global_crop_size=28)))


def test_mae_refuses_a_cnn_clearly():
    with pytest.raises(DinoflowError, match=r"method 'mae' needs a VIT backbone; test_efficientnet is a CNN"):
        build_method("mae", tiny_encoder("cnn"), {}, MethodSetup(views=ViewSettings(global_crop_size=28)))


def test_vit_sizes_must_be_multiples_of_the_patch():
    with pytest.raises(DinoflowError, match=r"methods.jigsaw.tile_size \(15 px\) must be a multiple"):
        build_method("jigsaw", tiny_encoder("vit"), {**PRETEXT["jigsaw"], "tile_size": 15},
                     MethodSetup(views=ViewSettings(global_crop_size=28)))
    build_method("jigsaw", tiny_encoder("cnn"), {**PRETEXT["jigsaw"], "tile_size": 15},
                 MethodSetup(views=ViewSettings(global_crop_size=28)))  # a CNN takes any size


@pytest.mark.parametrize("method,kind", CASES)
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(method, kind, images):
    engine = _engine(method, kind, images, epochs=1, lr=0.05)
    batch = _first_batch(engine)
    losses = []
    for _ in range(8):
        values = engine.train_step(batch, 0)
        losses.append(values["loss/total"])
        std = values[f"{engine.method.evaluated_network}/std"]  # the collapse monitor of the exported network
        assert math.isfinite(std) and std > 0
    assert sum(losses[-3:]) / 3 < losses[0] - max(0.05 * abs(losses[0]), 0.02), losses


def test_rotation_batch_carries_the_rotations_and_the_loss_is_cross_entropy(images):
    engine = _engine("rotation", "cnn", images)
    batch = _first_batch(engine)
    assert len(batch.views) == 4 and batch.targets["rotation"].shape == (8, 4)
    for b in range(batch.size):
        labels = batch.targets["rotation"][b].tolist()
        assert labels == [0, 1, 2, 3]
        for r in range(1, 4):  # every view is the first one turned by its label
            torch.testing.assert_close(batch.views[r][b], torch.rot90(batch.views[0][b], labels[r], dims=(1, 2)))
    m = engine.method
    m.eval()  # BatchNorm of the CNN on running statistics: the same whether views go in together or one by one
    with torch.no_grad():
        got = m.training_step(batch, _ctx())["loss"]
        logits = torch.cat([m.head(m.backbone(v)) for v in batch.views])
        labels = torch.cat([batch.targets["rotation"][:, r] for r in range(4)])
        want = -F.log_softmax(logits, dim=1)[torch.arange(len(labels)), labels].mean()
    torch.testing.assert_close(got, want)


def test_relative_position_batch_and_loss(images):
    engine = _engine("relative_position", "vit", images)
    batch = _first_batch(engine)
    assert [tuple(v.shape) for v in batch.views] == [(8, 3, 14, 14)] * 2
    offsets = batch.targets["neighbour_box"] - batch.targets["anchor_box"]
    step, jitter = 14 + 4, 1
    for label, (dy, dx) in zip(batch.targets["position"].tolist(), offsets.tolist()):
        for d, offset in zip(NEIGHBOURS[label], (dy, dx)):
            assert abs(offset - d * step) <= 2 * jitter
    m = engine.method
    with torch.no_grad():
        got = m.training_step(batch, _ctx())["loss"]
        logits = m.head(m.backbone(batch.views[0]), m.backbone(batch.views[1]))
        want = F.cross_entropy(logits, batch.targets["position"])
    torch.testing.assert_close(got, want)


def test_jigsaw_permutation_set_batch_and_loss(images):
    engine = _engine("jigsaw", "cnn", images)
    m = engine.method
    assert m.permutations.shape == (10, 9) and min_hamming_distance(m.permutations) >= 8
    batch = _first_batch(engine)
    assert len(batch.views) == 9 and batch.targets["permutation"].shape == (8,)
    m.eval()
    with torch.no_grad():
        got = m.training_step(batch, _ctx())["loss"]
        h = torch.stack([m.backbone(v) for v in batch.views], dim=1)  # (B, 9, D), input order
        want = F.cross_entropy(m.head(h), batch.targets["permutation"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_context_encoder_sees_only_the_masked_image_and_the_loss_is_l2_on_the_region(kind, images):
    engine = _engine("context_encoder", kind, images)
    batch = _first_batch(engine)
    masked, full, mask = batch.views[0], batch.views[1], batch.targets["mask"]
    assert mask.shape == (8, 1, 28, 28) and int(mask[0].sum()) == 14 * 14
    assert bool((masked.masked_select(mask.expand_as(masked)) == 0).all())
    torch.testing.assert_close(masked[~mask.expand_as(masked)], full[~mask.expand_as(full)])
    m = engine.method
    m.eval()
    with torch.no_grad():
        got = m.training_step(batch, _ctx())["loss"]
        pred = m.decoder(m.features(masked)[0])
        sel = mask.expand_as(pred)
        want = ((pred[sel] - full[sel]) ** 2).mean()
    torch.testing.assert_close(got, want)


def test_context_encoder_adversarial_term_trains_the_discriminator(images):
    engine = tiny_engine("context_encoder", "cnn", images,
                         section={**PRETEXT["context_encoder"], "adversarial_weight": 0.001, "discriminator_dim": 4})
    m = engine.method
    assert m.discriminator is not None
    before = [p.detach().clone() for p in m.discriminator.parameters()]
    values = engine.train_step(_first_batch(engine), 0)
    assert {"loss/reconstruction", "loss/adversarial", "loss/discriminator"} <= set(values)
    assert values["loss/total"] == pytest.approx(0.999 * values["loss/reconstruction"]
                                                 + 0.001 * values["loss/adversarial"] + values["loss/discriminator"],
                                                 rel=1e-5)
    assert any(not torch.equal(a, p) for a, p in zip(before, m.discriminator.parameters()))


def test_mae_batch_masks_and_loss(images):
    engine = _engine("mae", "vit", images)
    batch = _first_batch(engine)
    keep, hidden = batch.targets["idx_keep"], batch.targets["idx_mask"]
    assert keep.shape == (8, 1) and hidden.shape == (8, 3)  # 2x2 patches, 75 % hidden
    assert all(sorted(k + h) == [0, 1, 2, 3] for k, h in zip(keep.tolist(), hidden.tolist()))
    m = engine.method
    assert not any("visible" in n for n, _ in m.named_parameters())  # the lightly wrapper adds no parameters
    m.eval()
    with torch.no_grad():
        got = m.training_step(batch, _ctx())["loss"]
        x = batch.views[0]
        # reference: the ViT by hand on the visible tokens, then the decoder, then the per-patch normalised MSE
        vit = m.backbone.model
        seq = torch.cat([torch.zeros(8, 1, dtype=torch.long), keep + 1], dim=1)
        tok = vit._pos_embed(vit.patch_embed(x))
        tok = torch.gather(tok, 1, seq[..., None].expand(-1, -1, tok.shape[-1]))
        encoded = vit.norm(vit.blocks(tok))
        pred = m.decoder(encoded, seq, hidden + 1)
        patches = x.unfold(2, 14, 14).unfold(3, 14, 14)              # (B, 3, 2, 2, 14, 14)
        patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(8, 4, -1)  # row-major patches, (row, col, channel)
        target = torch.gather(patches, 1, hidden[..., None].expand(-1, -1, patches.shape[-1]))
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        want = ((pred - target) ** 2).mean()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", sorted(PRETEXT))
def test_batches_depend_only_on_the_seed(method, images):
    kind = "vit"
    a = _first_batch(_engine(method, kind, images))
    torch.manual_seed(123)  # whatever the global generator did before
    b = _first_batch(_engine(method, kind, images))
    for x, y in zip(a.views, b.views):
        torch.testing.assert_close(x, y)
    for k in a.targets:
        torch.testing.assert_close(a.targets[k], b.targets[k])


@pytest.mark.parametrize("method", ["jigsaw", "mae"])
def test_batches_are_the_same_with_dataloader_workers(method, images):
    a = _first_batch(_engine(method, "vit", images))
    b = _first_batch(_engine(method, "vit", images, num_workers=2))  # view makers pickled into worker processes
    for x, y in zip(a.views, b.views):
        torch.testing.assert_close(x, y)
    for k in a.targets:
        torch.testing.assert_close(a.targets[k], b.targets[k])
