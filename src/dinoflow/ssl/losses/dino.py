"""DINO CLS-token loss (DINO / DINOv2): cross-entropy between a sharpened, centred teacher and the student.

The teacher's logits become probabilities either by *centering* (subtract an EMA of the teacher's mean logits,
divide by the teacher temperature, softmax) or by *Sinkhorn-Knopp* (SwAV-style equipartition, DINOv2's
``methods.dinov2.centering: sinkhorn_knopp``). The loss averages ``-sum(p_teacher * log_softmax(student / student_temp))``
over every (teacher global view, student view) pair except a view with itself, as DINOv2 (its local + global
terms divided by the number of pairs).

Example:
    >>> import torch
    >>> from dinoflow.ssl.losses import DINOLoss
    >>> torch.manual_seed(0) and None
    >>> loss_fn = DINOLoss(out_dim=16, student_temp=0.1, center_momentum=0.9)
    >>> teacher = [torch.randn(4, 16) for _ in range(2)]                            # 2 global views, batch 4
    >>> student = [torch.randn(4, 16, requires_grad=True) for _ in range(2 + 3)]  # 2 global + 3 local views
    >>> loss = loss_fn(student, teacher, teacher_temp=0.04)  # 2*1 + 3*2 = 8 pairs, centre updated after
    >>> loss.backward()
    >>> bool(loss > 0), bool(loss_fn.center.abs().sum() > 0)
    (True, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dinoflow.errors import DinoflowError

CENTERING_MODES = ("centering", "sinkhorn_knopp")


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp assignment of ``(B, K)`` logits: rows (samples) sum to 1, prototypes get ~equal mass.

    DINOv2's ``sinkhorn_knopp_teacher``: ``Q = exp(logits / temp)``, then ``n_iterations`` of (normalise each
    prototype's total to 1/K, normalise each sample's total to 1/B), returned scaled so each sample's row sums to 1.
    Under ``torch.distributed`` the sums run over all processes' samples (B is the global count). The global max is
    subtracted before ``exp`` (a constant factor that the first normalisation removes) so sharp logits cannot
    overflow.
    """
    logits = teacher_logits.float() / teacher_temp
    top = logits.max() if logits.numel() else logits.new_zeros(())
    n = torch.tensor(float(logits.shape[0]), device=logits.device)
    if _dist_on():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        dist.all_reduce(n)
    q = torch.exp(logits - top).t()  # K x B, as the paper's notation
    k = q.shape[0]
    total = q.sum()
    if _dist_on():
        dist.all_reduce(total)
    q /= total
    for _ in range(n_iterations):
        rows = q.sum(dim=1, keepdim=True)  # mass per prototype, over all processes
        if _dist_on():
            dist.all_reduce(rows)
        q /= rows
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # mass per sample
        q /= n
    q *= n
    return q.t()


class TeacherCentering(nn.Module):
    """Shared teacher side of the DINO and iBOT losses: centre buffer, EMA update, centering / Sinkhorn-Knopp."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "centering", sinkhorn_iterations: int = 3):
        super().__init__()
        if centering not in CENTERING_MODES:
            raise DinoflowError(
                f"centering (methods.<name>.centering): unknown value {centering!r} (allowed: {', '.join(CENTERING_MODES)})"
            )
        if student_temp <= 0:
            raise DinoflowError(f"train.student_temp must be > 0, got {student_temp!r}")
        if not 0.0 <= center_momentum <= 1.0:
            raise DinoflowError(f"center_momentum must be in [0, 1], got {center_momentum!r}")
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.centering = centering
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``(M, K)`` teacher logits -> ``(M, K)`` float32 target distributions (no gradient, centre unchanged)."""
        if teacher_temp <= 0:
            raise DinoflowError(f"teacher temperature must be > 0, got {teacher_temp!r}")
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the teacher's mean logits (mean over all rows of all processes); a no-op for empty input."""
        x = teacher_logits.detach().float().reshape(-1, self.center.shape[-1])
        total = x.sum(dim=0, keepdim=True)
        count = torch.tensor(float(x.shape[0]), device=x.device)
        if _dist_on():
            dist.all_reduce(total)
            dist.all_reduce(count)
        if count.item() == 0:
            return
        batch_center = total / count
        self.center.mul_(self.center_momentum).add_(batch_center * (1.0 - self.center_momentum))


class DINOLoss(TeacherCentering):
    """DINO CLS-token loss; ``centering`` is ``"centering"`` (EMA centre) or ``"sinkhorn_knopp"``.

    ``forward(student, teacher, teacher_temp)`` takes lists of per-view ``(B, K)`` head outputs: ``teacher`` holds
    the global views, ``student`` the same global views first (same order) then the local views. Lower-level
    ``teacher_probs`` / ``cross_entropy`` / ``update_center`` let a training loop reuse the teacher targets (e.g. to
    log their entropy).
    """

    def cross_entropy(self, student_logits: Sequence[torch.Tensor],
                      teacher_probs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean over pairs (student view s, teacher view t), s != t, of the batch-mean cross-entropy."""
        n_t, n_s = len(teacher_probs), len(student_logits)
        n_terms = n_t * n_s - min(n_t, n_s)
        if n_terms == 0:
            raise DinoflowError(
                f"DINOLoss: {n_t} teacher view(s) and {n_s} student view(s) leave no pair of different views"
            )
        t = torch.stack(list(teacher_probs))  # T x B x K
        lsm = F.log_softmax(torch.stack(list(student_logits)).float() / self.student_temp, dim=-1)  # S x B x K
        batch = t.shape[1]
        # ce[t, s] = sum over batch and prototypes of -p_t * log q_s: one matmul, no T x S x B x K tensor.
        ce = -(t.reshape(n_t, -1) @ lsm.reshape(n_s, -1).t())
        same_view = torch.eye(n_t, n_s, dtype=torch.bool, device=ce.device)
        return ce.masked_fill(same_view, 0.0).sum() / (n_terms * batch)

    def forward(self, student_logits: Sequence[torch.Tensor], teacher_logits: Sequence[torch.Tensor],
                teacher_temp: float, update_center: bool = True) -> torch.Tensor:
        if len(teacher_logits) == 0 or len(student_logits) == 0:
            raise DinoflowError("DINOLoss: needs at least one teacher view and one student view")
        probs = self.teacher_probs(torch.cat(list(teacher_logits)), teacher_temp).chunk(len(teacher_logits))
        loss = self.cross_entropy(student_logits, probs)
        if update_center and self.centering == "centering":
            self.update_center(torch.cat(list(teacher_logits)))
        return loss
