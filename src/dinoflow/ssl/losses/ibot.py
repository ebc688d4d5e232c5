"""iBOT masked-patch loss (as in DINOv2): the student sees masked patches, the teacher the unmasked image.

Only masked patch tokens enter: for each masked token the cross-entropy between the teacher's target (centred with
the loss's own EMA centre, or Sinkhorn-Knopp) and the student's ``log_softmax(logits / student_temp)``. Each
token is weighted by ``1 / (masked tokens in its image)`` and the sum is divided by the number of images
(including images without a mask, as DINOv2's ``forward_masked``): the mean over images of the per-image mean.

The masked rows are in ``masks.flatten().nonzero()`` order (image-major), i.e. what
``tokens.flatten(0, 1)[masks.flatten()]`` selects from ``(B, N, D)`` patch tokens.

Example:
    >>> import torch
    >>> from dinoflow.ssl.losses import iBOTPatchLoss
    >>> torch.manual_seed(0) and None
    >>> masks = torch.zeros(3, 4, dtype=torch.bool)       # 3 images, 2x2 patch grid
    >>> masks[0, :2] = True; masks[2, 1:] = True         # image 1 unmasked
    >>> m = int(masks.sum())                              # 5 masked tokens
    >>> loss_fn = iBOTPatchLoss(patch_out_dim=8)
    >>> student = torch.randn(m, 8, requires_grad=True)
    >>> loss = loss_fn(student, torch.randn(m, 8), masks, teacher_temp=0.04)
    >>> loss.backward()
    >>> student.grad.shape
    torch.Size([5, 8])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dinoflow.errors import DinoflowError
from dinoflow.ssl.losses.dino import TeacherCentering


def masks_weight(masks: torch.Tensor) -> torch.Tensor:
    """Per masked token ``1 / (masked tokens in its image)``, in ``masks.flatten().nonzero()`` order."""
    flat = masks.flatten(1)
    return (1.0 / flat.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(flat)[flat]


class iBOTPatchLoss(TeacherCentering):  # noqa: N801 - DINOv2's name
    """iBOT patch loss over masked tokens; ``centering`` is ``"centering"`` (own EMA centre) or ``"sinkhorn_knopp"``.

    ``forward(student_masked, teacher_masked, masks, teacher_temp)``: ``(M, K)`` head outputs of the masked tokens
    and the ``(B, N)`` (or ``(B, h, w)``) boolean mask with ``M`` true entries.
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "centering", sinkhorn_iterations: int = 3):
        super().__init__(patch_out_dim, student_temp, center_momentum, centering, sinkhorn_iterations)

    def cross_entropy(self, student_masked_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
        """``-sum_tokens(weight * sum_k p_t * log q_s) / n_images``; ``weights`` defaults to :func:`masks_weight`."""
        masks = masks.flatten(1).bool()
        m = int(masks.sum())
        if student_masked_logits.shape[0] != m or teacher_probs.shape[0] != m:
            raise DinoflowError(
                f"iBOTPatchLoss: masks select {m} tokens but got {student_masked_logits.shape[0]} student and "
                f"{teacher_probs.shape[0]} teacher rows"
            )
        if weights is None:
            weights = masks_weight(masks)
        lsm = F.log_softmax(student_masked_logits.float() / self.student_temp, dim=-1)
        per_token = torch.sum(teacher_probs * lsm, dim=-1)
        return -(per_token * weights).sum() / masks.shape[0]

    def forward(self, student_masked_logits: torch.Tensor, teacher_masked_logits: torch.Tensor, masks: torch.Tensor,
                teacher_temp: float, weights: torch.Tensor | None = None,
                update_center: bool = True) -> torch.Tensor:
        probs = self.teacher_probs(teacher_masked_logits, teacher_temp)
        loss = self.cross_entropy(student_masked_logits, probs, masks, weights)
        if update_center and self.centering == "centering":
            self.update_center(teacher_masked_logits)
        return loss
