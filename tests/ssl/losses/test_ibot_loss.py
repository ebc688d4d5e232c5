"""iBOTPatchLoss against the per-image formula, DINOv2's dense forward, and lightly.loss.IBOTPatchLoss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinoflow.errors import DinoflowError
from dinoflow.ssl.losses import iBOTPatchLoss, masks_weight, sinkhorn_knopp

K, N = 10, 9  # prototypes, 3x3 patch grid


def _masks() -> torch.Tensor:
    m = torch.zeros(4, N, dtype=torch.bool)
    m[0, [0, 1, 4]] = True
    m[1, [8]] = True
    m[3, :6] = True  # image 2 has no mask
    return m


def _tokens(seed: int, m: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, K, generator=g), torch.randn(m, K, generator=g)


def _formula(student, teacher, masks, center, t_temp, s_temp):
    """Per image: mean over its masked tokens of -sum_k p log q; then the mean over all images (unmasked: 0)."""
    per_image, row = [], 0
    for b in range(masks.shape[0]):
        n = int(masks[b].sum())
        ces = []
        for _ in range(n):
            tl = (teacher[row].double().numpy() - center) / t_temp
            p = np.exp(tl - tl.max()); p /= p.sum()
            sl = student[row].double().numpy() / s_temp
            logq = sl - (sl.max() + np.log(np.exp(sl - sl.max()).sum()))
            ces.append(-(p * logq).sum())
            row += 1
        per_image.append(np.mean(ces) if ces else 0.0)
    return float(np.mean(per_image))


def test_matches_formula_with_center_updates():
    masks = _masks()
    loss_fn = iBOTPatchLoss(K, student_temp=0.1, center_momentum=0.9)
    center = np.zeros(K)
    for step in range(3):
        student, teacher = _tokens(step, int(masks.sum()))
        expected = _formula(student, teacher, masks, center, 0.06, 0.1)
        assert loss_fn(student, teacher, masks, teacher_temp=0.06).item() == pytest.approx(expected, rel=1e-5)
        center = 0.9 * center + 0.1 * teacher.double().mean(0).numpy()
        np.testing.assert_allclose(loss_fn.center.reshape(-1).numpy(), center, rtol=1e-5, atol=1e-7)


def test_matches_dinov2_dense_forward():
    """DINOv2's iBOTPatchLoss.forward on full (B, N, K) tensors equals forward_masked on the selected rows."""
    masks = _masks()
    g = torch.Generator().manual_seed(11)
    s_dense, t_dense = torch.randn(4, N, K, generator=g), torch.randn(4, N, K, generator=g)
    loss_fn = iBOTPatchLoss(K)
    t_probs_dense = torch.softmax(t_dense / 0.05, dim=-1)
    per_tok = (t_probs_dense * torch.log_softmax(s_dense / 0.1, dim=-1)).sum(-1)
    dense = -((per_tok * masks.float()).sum(-1) / masks.sum(-1).clamp(min=1.0)).mean()
    sel = masks.flatten()
    got = loss_fn(s_dense.flatten(0, 1)[sel], t_dense.flatten(0, 1)[sel], masks, teacher_temp=0.05)
    assert got.item() == pytest.approx(dense.item(), rel=1e-6)


def test_matches_lightly_ibot_patch_loss_over_steps():
    lightly_loss = pytest.importorskip("lightly.loss")
    ref = lightly_loss.IBOTPatchLoss(output_dim=K, teacher_temp=0.04, student_temp=0.1, center_momentum=0.9)
    ours = iBOTPatchLoss(K, student_temp=0.1, center_momentum=0.9)
    masks = _masks()
    for step, t_temp in enumerate([0.04, 0.06, 0.07]):
        student, teacher = _tokens(50 + step, int(masks.sum()))
        expected = ref(teacher, student, masks.reshape(4, 3, 3), teacher_temp=t_temp)
        got = ours(student, teacher, masks.reshape(4, 3, 3), teacher_temp=t_temp)  # (B, h, w) masks accepted
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
        torch.testing.assert_close(ours.center.reshape(-1), ref.center.value.reshape(-1))


def test_masks_weight_sums_to_one_per_masked_image():
    masks = _masks()
    w = masks_weight(masks)
    assert w.shape == (int(masks.sum()),)
    owner = masks.flatten().nonzero().flatten() // N
    sums = torch.zeros(4).index_add_(0, owner, w)
    torch.testing.assert_close(sums, torch.tensor([1.0, 1.0, 0.0, 1.0]))


def test_sinkhorn_targets():
    masks = _masks()
    student, teacher = _tokens(3, int(masks.sum()))
    loss_fn = iBOTPatchLoss(K, centering="sinkhorn_knopp")
    q = sinkhorn_knopp(teacher, 0.05)
    torch.testing.assert_close(loss_fn.teacher_probs(teacher, 0.05), q)
    expected = -((q * torch.log_softmax(student / 0.1, -1)).sum(-1) * masks_weight(masks)).sum() / 4
    assert loss_fn(student, teacher, masks, teacher_temp=0.05).item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.count_nonzero(loss_fn.center) == 0


def test_no_masked_token_gives_zero_and_keeps_center():
    loss_fn = iBOTPatchLoss(K)
    masks = torch.zeros(3, N, dtype=torch.bool)
    empty = torch.zeros(0, K, requires_grad=True)
    loss = loss_fn(empty, torch.zeros(0, K), masks, teacher_temp=0.04)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(loss_fn.center) == 0


def test_row_count_mismatch_raises():
    with pytest.raises(DinoflowError, match="masks select"):
        iBOTPatchLoss(K)(torch.zeros(3, K), torch.zeros(3, K), _masks(), teacher_temp=0.04)
