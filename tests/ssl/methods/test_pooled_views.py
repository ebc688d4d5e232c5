"""`pooled_views`: several views through the backbone in one call when that is the same maths (no BatchNorm using
batch statistics), one call per view otherwise; the methods that show one backbone several views use it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dinoflow.errors import DinoflowError
from dinoflow.ssl.methods.base import StepContext, collate_views, pooled, pooled_views, uses_batch_statistics
from dinoflow.train.engine import allow_any_input_size
from method_helpers import tiny_encoder, tiny_engine, tiny_images


def _count_calls(backbone) -> list[int]:
    """Counts backbone forward passes with a forward hook on its first convolution (ViT patch embedding, CNN
    stem); returns a list whose first item is the count."""
    first = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d))
    calls = [0]
    first.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _views(*sizes: int, b: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, s, s, generator=g) for s in sizes]


def test_vit_views_go_through_one_call_and_equal_per_view_calls():
    vit = tiny_encoder("vit").train()
    assert not uses_batch_statistics(vit)
    views = _views(28, 28)
    want = [pooled(vit, v) for v in views]
    calls = _count_calls(vit)
    got = pooled_views(vit, views)
    assert calls[0] == 1
    assert len(got) == 2 and all(g.shape == (4, vit.embed_dim) for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_vit_gradients_equal_per_view_calls():
    vit = tiny_encoder("vit").train()
    views = _views(28, 28, seed=1)
    ref = copy.deepcopy(vit)
    sum(h.square().sum() for h in pooled_views(vit, views)).backward()
    sum(pooled(ref, v).square().sum() for v in views).backward()
    for (name, p), q in zip(vit.named_parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_vit_multicrop_one_call_per_resolution_in_order():
    vit = tiny_encoder("vit")
    allow_any_input_size(vit)
    views = _views(28, 28, 14, 14, 14)
    want = [pooled(vit, v) for v in views]
    calls = _count_calls(vit)
    got = pooled_views(vit, views)
    assert calls[0] == 2  # 2 x 28 px in one call, 3 x 14 px in another (DINO's MultiCropWrapper)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # views of one size that are not consecutive are not reordered: one call per run
    calls[0] = 0
    got = pooled_views(vit, [views[0], views[2], views[1]])
    assert calls[0] == 3
    torch.testing.assert_close(got[2], want[1], rtol=1e-5, atol=1e-5)


def test_batchnorm_cnn_in_training_mode_makes_one_call_per_view_bit_identically():
    cnn = tiny_encoder("cnn").train()
    assert uses_batch_statistics(cnn)
    ref = copy.deepcopy(cnn)
    views = _views(28, 28)
    calls = _count_calls(cnn)
    got = pooled_views(cnn, views)
    want = [pooled(ref, v) for v in views]
    assert calls[0] == 2
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    for (name, a), b in zip(cnn.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name  # running statistics updated once per view, as per-view calls do


def test_multi_crop_concatenates_each_resolution_even_with_batchnorm_as_swav_and_dino_do():
    """multi_crop=True (SwAV / DINO official code): one call per resolution on a training-mode BatchNorm CNN, equal
    to a hand-written torch.cat call per resolution (BatchNorm statistics over that resolution's crops)."""
    cnn = tiny_encoder("cnn").train()
    allow_any_input_size(cnn)
    ref = copy.deepcopy(cnn)
    views = _views(28, 28, 20, 20, 20, seed=3)
    calls = _count_calls(cnn)
    got = pooled_views(cnn, views, multi_crop=True)
    assert calls[0] == 2
    want = list(pooled(ref, torch.cat(views[:2])).split(4)) + list(pooled(ref, torch.cat(views[2:])).split(4))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    for (name, a), b in zip(cnn.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name


def test_batchnorm_cnn_in_eval_mode_may_concatenate():
    cnn = tiny_encoder("cnn").eval()
    assert not uses_batch_statistics(cnn)
    views = _views(28, 28)
    want = [pooled(cnn, v) for v in views]
    calls = _count_calls(cnn)
    got = pooled_views(cnn, views)
    assert calls[0] == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_batch_statistics_detection():
    assert uses_batch_statistics(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train())
    assert not uses_batch_statistics(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval())
    # no running statistics: BatchNorm normalises by the batch in eval mode too
    assert uses_batch_statistics(nn.BatchNorm2d(3, track_running_stats=False).eval())
    assert uses_batch_statistics(nn.SyncBatchNorm(3).train())
    assert not uses_batch_statistics(nn.Sequential(nn.LayerNorm(3), nn.GroupNorm(1, 3)).train())


def test_other_layers_with_running_statistics_in_training_mode_get_one_call_per_view():
    """Not only BatchNorm: timm's EvoNorm B0 (``norm_layer: evonormb0`` in a CNN's backbone.kwargs) divides by the
    batch variance in training mode, and an InstanceNorm tracking running statistics updates them per call; both
    must see each view alone, as per-view calls do (outputs and running statistics bit-identical)."""
    from dinoflow.models.encoder import Encoder

    torch.manual_seed(0)
    evo = Encoder("test_efficientnet", 28, {"norm_layer": "evonormb0"}).train()
    assert any(type(m).__name__ == "EvoNorm2dB0" for m in evo.modules())
    assert uses_batch_statistics(evo)
    assert not uses_batch_statistics(copy.deepcopy(evo).eval())  # eval: its running variance, per sample
    ref = copy.deepcopy(evo)
    views = _views(28, 28, seed=2)
    got = pooled_views(evo, views)
    for g, w in zip(got, [pooled(ref, v) for v in views], strict=True):
        assert torch.equal(g, w)
    for (name, a), b in zip(evo.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    instance = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True))
    assert uses_batch_statistics(instance.train()) and not uses_batch_statistics(instance.eval())
    assert not uses_batch_statistics(nn.InstanceNorm2d(4).train())  # per-sample statistics only


def test_no_views_is_an_error():
    with pytest.raises(DinoflowError, match="no views"):
        pooled_views(tiny_encoder("vit"), [])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return tiny_images(tmp_path_factory.mktemp("pooled_views"), n=8)


# (method, backbones that see both views in the step); the EMA methods' target / momentum backbone too
TWO_VIEW = {"simclr": ("backbone",), "simsiam": ("backbone",), "barlow_twins": ("backbone",),
            "vicreg": ("backbone",), "byol": ("backbone", "target_backbone"),
            "moco_v3": ("backbone", "momentum_backbone"), "swav": ("backbone",)}


@pytest.mark.parametrize("method", sorted(TWO_VIEW))
@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_methods_call_each_backbone_once_per_resolution_on_vits_and_once_per_view_with_batchnorm(method, kind,
                                                                                                  images):
    engine = tiny_engine(method, kind, images, epochs=1)
    engine.set_epoch(0)
    batch = collate_views([engine.dataset[i] for i in range(4)])
    m = engine.method
    counters = {name: _count_calls(getattr(m, name)) for name in TWO_VIEW[method]}
    with torch.no_grad():
        m.training_step(batch, StepContext(step=0, epoch=0, total_steps=1, values={"momentum": 0.9}))
    resolutions = len({tuple(v.shape[1:]) for v in batch.views})
    # scratch CNNs: every backbone (EMA teachers too, as BYOL / MoCo v3 run them) normalises by batch statistics
    assert all(uses_batch_statistics(getattr(m, name)) == (kind == "cnn") for name in TWO_VIEW[method])
    # SwAV follows its official multi-crop code: one call per resolution with BatchNorm too
    want = resolutions if kind == "vit" or method == "swav" else len(batch.views)
    assert {k: c[0] for k, c in counters.items()} == {k: want for k in counters}
