"""DINOLoss against the written-out formula, DINOv2's local/global split, and lightly.loss.DINOLoss; Sinkhorn-Knopp
against lightly's SwAV sinkhorn and a NumPy transcription."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinoflow.errors import DinoflowError
from dinoflow.ssl.losses import DINOLoss, sinkhorn_knopp

K, B = 12, 5


def _views(seed: int, n_teacher: int = 2, n_student: int = 5, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    teacher = [scale * torch.randn(B, K, generator=g) for _ in range(n_teacher)]
    student = [scale * torch.randn(B, K, generator=g) for _ in range(n_student)]
    return student, teacher


def _formula(student, teacher, center, t_temp, s_temp):
    """Scalar loops in float64: mean over pairs (s != t) of the batch mean of -sum_k p_t log q_s."""
    center = np.asarray(center, dtype=np.float64).reshape(-1)
    total, terms = 0.0, 0
    for ti, t in enumerate(teacher):
        for si, s in enumerate(student):
            if si == ti:
                continue
            ce = 0.0
            for b in range(B):
                tl = (t[b].double().numpy() - center) / t_temp
                p = np.exp(tl - tl.max()); p /= p.sum()
                sl = s[b].double().numpy() / s_temp
                logq = sl - (sl.max() + np.log(np.exp(sl - sl.max()).sum()))
                ce += -(p * logq).sum()
            total += ce / B
            terms += 1
    return total / terms


def test_matches_formula_over_steps_with_center_updates():
    loss_fn = DINOLoss(K, student_temp=0.1, center_momentum=0.9)
    center = np.zeros(K)
    for step in range(3):
        student, teacher = _views(step)
        expected = _formula(student, teacher, center, t_temp=0.05, s_temp=0.1)
        got = loss_fn(student, teacher, teacher_temp=0.05)
        assert got.item() == pytest.approx(expected, rel=1e-5)
        batch_center = torch.cat(teacher).double().mean(0).numpy()
        center = 0.9 * center + 0.1 * batch_center
        np.testing.assert_allclose(loss_fn.center.reshape(-1).numpy(), center, rtol=1e-5, atol=1e-7)


def test_matches_dinov2_local_plus_global_split():
    """DINOv2's ssl_meta_arch: locals vs both teachers, globals vs the swapped teachers, both / (2 + 2 * n_local)."""
    student, teacher = _views(7, n_student=2 + 3)
    loss_fn = DINOLoss(K, student_temp=0.1)
    probs = loss_fn.teacher_probs(torch.cat(teacher), 0.04).chunk(2)
    n_terms = 2 * 1 + 3 * 2
    lsm = [torch.log_softmax(s / 0.1, dim=-1) for s in student]
    local = -sum((t * q).sum(-1).mean() for q in lsm[2:] for t in probs) / n_terms
    swapped = torch.cat((probs[1], probs[0]))
    global_ = -(swapped * torch.cat(lsm[:2])).sum(-1).mean() * 2 / n_terms
    got = loss_fn(student, teacher, teacher_temp=0.04)
    assert got.item() == pytest.approx((local + global_).item(), rel=1e-6)


def test_matches_lightly_dino_loss_over_steps():
    lightly_loss = pytest.importorskip("lightly.loss")
    # lightly: DINOLoss(output_dim, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, student_temp,
    # center_momentum); forward(teacher_out, student_out, teacher_temp) excludes the same view index as we do.
    ref = lightly_loss.DINOLoss(output_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.04,
                                warmup_teacher_temp_epochs=1, student_temp=0.1, center_momentum=0.8)
    ours = DINOLoss(K, student_temp=0.1, center_momentum=0.8)
    for step, t_temp in enumerate([0.04, 0.05, 0.07]):
        student, teacher = _views(100 + step, n_student=6)
        expected = ref(teacher, student, teacher_temp=t_temp)
        got = ours(student, teacher, teacher_temp=t_temp)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
        torch.testing.assert_close(ours.center.reshape(-1), ref.center.reshape(-1))


def test_gradient_flows_to_student_only():
    student, teacher = _views(3)
    student = [s.requires_grad_() for s in student]
    teacher = [t.requires_grad_() for t in teacher]
    DINOLoss(K)(student, teacher, teacher_temp=0.04).backward()
    assert all(s.grad is not None and torch.isfinite(s.grad).all() for s in student)
    assert all(t.grad is None for t in teacher)


def test_update_center_false_keeps_center_and_sinkhorn_never_updates_it():
    student, teacher = _views(4)
    fixed = DINOLoss(K)
    fixed(student, teacher, teacher_temp=0.04, update_center=False)
    assert torch.count_nonzero(fixed.center) == 0
    sk = DINOLoss(K, centering="sinkhorn_knopp")
    sk(student, teacher, teacher_temp=0.04)
    assert torch.count_nonzero(sk.center) == 0


def test_sinkhorn_mode_uses_sinkhorn_targets():
    student, teacher = _views(5)
    loss_fn = DINOLoss(K, student_temp=0.1, centering="sinkhorn_knopp")
    q = sinkhorn_knopp(torch.cat(teacher), 0.05).chunk(2)
    lsm = [torch.log_softmax(s / 0.1, dim=-1) for s in student]
    pairs = [(t, s) for t in range(2) for s in range(len(student)) if t != s]
    expected = sum(-(q[t] * lsm[s]).sum(-1).mean() for t, s in pairs) / len(pairs)
    assert loss_fn(student, teacher, teacher_temp=0.05).item() == pytest.approx(expected.item(), rel=1e-6)


def _numpy_sinkhorn(logits: np.ndarray, temp: float, n_iter: int) -> np.ndarray:
    q = np.exp(logits / temp).T  # K x B
    k, b = q.shape
    q = q / q.sum()
    for _ in range(n_iter):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / b
    return (q * b).T


@pytest.mark.parametrize("n_iter", [1, 3, 10])
def test_sinkhorn_matches_numpy_and_lightly(n_iter):
    logits = torch.randn(9, K, generator=torch.Generator().manual_seed(n_iter)).double()
    got = sinkhorn_knopp(logits, 0.1, n_iterations=n_iter)
    np.testing.assert_allclose(got.numpy(), _numpy_sinkhorn(logits.numpy(), 0.1, n_iter), rtol=1e-5)
    swav = pytest.importorskip("lightly.loss.swav_loss")
    torch.testing.assert_close(got, swav.sinkhorn(logits.float(), iterations=n_iter, epsilon=0.1).float(),
                               rtol=1e-5, atol=1e-7)


def test_sinkhorn_marginals():
    logits = torch.randn(24, 6, generator=torch.Generator().manual_seed(0))
    q = sinkhorn_knopp(logits, 0.1, n_iterations=3)
    torch.testing.assert_close(q.sum(1), torch.ones(24))  # every sample is a distribution (last step)
    q = sinkhorn_knopp(logits, 0.1, n_iterations=200)
    torch.testing.assert_close(q.sum(0), torch.full((6,), 24 / 6), rtol=1e-3, atol=1e-3)  # equipartition


def test_sinkhorn_survives_sharp_logits():
    logits = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
    q = sinkhorn_knopp(logits, 0.001)  # exp(1000) overflows without the max shift
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(3))


def test_bad_arguments():
    with pytest.raises(DinoflowError, match="centering"):
        DINOLoss(K, centering="mean")
    with pytest.raises(DinoflowError, match="temperature"):
        DINOLoss(K).teacher_probs(torch.zeros(2, K), 0.0)
    with pytest.raises(DinoflowError, match="no pair"):
        DINOLoss(K)([torch.zeros(2, K)], [torch.zeros(2, K)], teacher_temp=0.04)


def test_bf16_logits_give_a_float32_loss_close_to_fp32():
    """Under bf16 autocast the head emits bf16 logits; the loss and the centre are computed in float32."""
    student, teacher = _views(9)
    ref = DINOLoss(K)(student, teacher, teacher_temp=0.07)
    loss_fn = DINOLoss(K)
    got = loss_fn([s.bfloat16() for s in student], [t.bfloat16() for t in teacher], teacher_temp=0.07)
    assert got.dtype == torch.float32 and loss_fn.center.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=2e-2)
