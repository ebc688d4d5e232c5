"""DINOHead: unit-norm prototypes, the cosine formula, lightly's DINOv2ProjectionHead, last-layer freezing."""

from __future__ import annotations

import pytest
import torch

from dinoflow.errors import DinoflowError
from dinoflow.ssl.heads import DINOHead, cancel_last_layer_gradients


def _head(seed: int = 0, **kw) -> DINOHead:
    torch.manual_seed(seed)
    return DINOHead(in_dim=12, out_dim=20, hidden_dim=16, bottleneck_dim=8, **kw)


def test_prototypes_have_unit_norm_and_stay_so_after_training():
    head = _head()
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(20))
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=10.0)
    for _ in range(3):
        opt.zero_grad()
        head(torch.randn(6, 12)).pow(2).sum().backward()
        opt.step()
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(20))


def test_output_is_cosine_between_bottleneck_and_prototypes():
    head = _head()
    x = torch.randn(5, 12)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    v = head.last_layer.parametrizations.weight.original1
    expected = z @ torch.nn.functional.normalize(v, dim=1).t()
    torch.testing.assert_close(head(x), expected)
    assert head(x).abs().max() <= 1.0 + 1e-6


def test_mlp_structure_and_init():
    head = _head(nlayers=3)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 16), (16, 16), (16, 8)]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    assert all(m.weight.abs().max() <= 2.0 for m in linears)  # truncated normal
    assert isinstance(_head(nlayers=1).mlp, torch.nn.Linear)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_matches_lightly_dinov2_projection_head():
    heads = pytest.importorskip("lightly.models.modules.heads")
    ours = _head()
    ref = heads.DINOv2ProjectionHead(input_dim=12, hidden_dim=16, bottleneck_dim=8, output_dim=20)
    ours_lin = [m for m in ours.mlp if isinstance(m, torch.nn.Linear)]
    ref_lin = [m for m in ref.layers if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for a, b in zip(ours_lin, ref_lin, strict=True):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
        ref.last_layer.weight_v.copy_(ours.last_layer.parametrizations.weight.original1)
        ref.last_layer.weight_g.fill_(1.0)
    x = torch.randn(7, 12)
    torch.testing.assert_close(ours(x), ref(x))


def test_cancel_last_layer_gradients_during_freeze_only():
    head = _head()
    before = head.last_layer.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    head(torch.randn(4, 12)).sum().backward()
    assert cancel_last_layer_gradients(head, epoch=0, freeze_last_layer_epochs=1) == 1
    assert all(p.grad is None for p in head.last_layer.parameters())
    assert all(p.grad is not None for p in head.mlp.parameters())
    opt.step()
    torch.testing.assert_close(head.last_layer.weight, before)  # frozen: no update, no weight decay
    opt.zero_grad()
    head(torch.randn(4, 12)).sum().backward()
    assert cancel_last_layer_gradients(head, epoch=1, freeze_last_layer_epochs=1) == 0
    opt.step()
    assert not torch.allclose(head.last_layer.weight, before)


def test_cancel_works_on_a_container_of_heads():
    student = torch.nn.ModuleDict({"backbone": torch.nn.Linear(3, 12), "dino_head": _head()})
    student["dino_head"](student["backbone"](torch.randn(2, 3))).sum().backward()
    assert cancel_last_layer_gradients(student, epoch=0, freeze_last_layer_epochs=2) == 1
    assert student["backbone"].weight.grad is not None


def test_bad_dimension_raises():
    with pytest.raises(DinoflowError, match="out_dim"):
        DINOHead(in_dim=4, out_dim=0)
