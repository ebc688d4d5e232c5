"""Blocks shared by several methods: gathering over processes, a persistent feature queue, the loss helpers.

Distributed convention (see `dinoflow.ssl.methods.base`): batch-level losses gather every process's outputs
with `gather` (differentiable) and compute the loss of the *global* batch on every process; with DDP's gradient
averaging this gives exactly the single-process gradient, so N processes equal one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dinoflow.errors import DinoflowError
from dinoflow.ssl.heads import cancel_last_layer_gradients
from dinoflow.train.distributed import all_gather_with_grad, is_distributed
from dinoflow.train.schedules import teacher_temp_schedule

N_GLOBAL = 2  # global crops of the multi-crop methods (DINO, DINOv2)


def gather(x: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` of this process -> ``(B * world, ...)`` of the global batch, in rank order (differentiable)."""
    return all_gather_with_grad(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """As `gather`, without gradient (keys for a queue)."""
    if not is_distributed():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


class FeatureQueue(nn.Module):
    """A FIFO queue of ``size`` feature vectors of dimension ``dim`` (MoCo negatives, SwAV's stored crops).

    Unlike lightly's ``MemoryBankModule`` the buffers are *persistent* (saved in the training state, so resume is
    bit-exact) and initialised from a seeded generator; ``filled`` counts valid rows (SwAV uses only filled rows).
    Call `push` with the global batch (every process holds the same queue).
    """

    def __init__(self, size: int, dim: int, seed: int = 0, normalize: bool = True):
        super().__init__()
        if size < 1 or dim < 1:
            raise DinoflowError(f"FeatureQueue: size and dim must be >= 1, got {size}, {dim}")
        g = torch.Generator().manual_seed(int(seed))
        init = torch.randn(size, dim, generator=g)
        self.register_buffer("features", F.normalize(init, dim=1) if normalize else init)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return int(self.features.shape[0])

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        """Write the rows of ``x`` (``(n, dim)``) at the pointer, wrapping around; the oldest rows are replaced."""
        x = x.detach().to(self.features.dtype)
        n = x.shape[0]
        if n >= self.size:
            self.features.copy_(x[-self.size:])
            self.ptr.zero_()
            self.filled.fill_(self.size)
            return
        p = int(self.ptr)
        idx = (torch.arange(n, device=x.device) + p) % self.size
        self.features[idx] = x
        self.ptr.fill_((p + n) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))

    def valid(self) -> torch.Tensor:
        """The rows written so far (all rows once the queue has wrapped)."""
        return self.features[: int(self.filled)] if int(self.filled) < self.size else self.features


def info_nce(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor | None,
             temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: ``CE([q.k+, q.K^T] / T, 0)`` with L2-normalised rows (Oord et al. 2018; He et al. 2020).

    query, positive: ``(B, D)``; negatives: ``(K, D)`` (None: in-batch keys only, as MoCo v3's
    ``CE(q k^T / T, arange(B))``). Mean over the batch.
    """
    q, k = F.normalize(query, dim=1), F.normalize(positive, dim=1)
    if negatives is None:
        logits = q @ k.t() / temperature
        labels = torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits, labels)
    neg = F.normalize(negatives, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ neg.t()], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def check_positive(name: str, **values: float) -> None:
    """Raise DinoflowError naming ``methods.<name>.<key>`` for a value <= 0."""
    for key, v in values.items():
        if v is None or v <= 0:
            raise DinoflowError(f"methods.{name}.{key}: must be > 0, got {v!r}")


def check_momentum(name: str, momentum: float, momentum_end: float) -> None:
    for key, v in (("momentum", momentum), ("momentum_end", momentum_end)):
        if not 0.0 <= v <= 1.0:
            raise DinoflowError(f"methods.{name}.{key}: must be in [0, 1], got {v!r}")


class DINOTeacherMixin:
    """What DINO v1 and DINOv2 share about their EMA teacher (Caron et al. 2021; Oquab et al. 2023): the student
    backbone + head are averaged into the teacher's, the teacher temperature warms up, the teacher backbone is the
    exported network, and the head's last layer is frozen for `freeze_last_layer_epochs`. Mix in before SSLMethod;
    expects `backbone`, `head`, `teacher_backbone`, `teacher_head` and a `cfg` with the DINO temperature fields."""

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    def schedules(self, epochs, steps_per_epoch):
        c = self.cfg
        return {"teacher/temp": teacher_temp_schedule(c.warmup_teacher_temp, c.teacher_temp,
                                                      c.warmup_teacher_temp_epochs, epochs, steps_per_epoch)}

    def exported_backbone(self):
        return self.teacher_backbone

    def after_backward(self, ctx) -> None:
        cancel_last_layer_gradients(self.head, ctx.epoch, self.cfg.freeze_last_layer_epochs)

    def dino_cls_loss(self, teacher_logits: torch.Tensor, student_global_logits: torch.Tensor,
                      student_local_logits: torch.Tensor | None, n_local: int,
                      temp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DINO's CLS loss with `self.dino_loss` (a `dinoflow.ssl.losses.DINOLoss`): every teacher global view
        against every other student view (Caron et al. 2021, eq. 3; DINOv2's ``SSLMetaArch``).

        teacher_logits, student_global_logits: ``(N_GLOBAL * B, K)``, view-major; student_local_logits:
        ``(n_local * B, K)`` or None; temp: the teacher temperature. The EMA centre is updated when the loss
        centres. Returns (loss, the teacher's probabilities ``(N_GLOBAL * B, K)``, the loss minus the teacher's
        mean entropy, detached: KL(teacher || student), the part the student can reduce)."""
        probs = self.dino_loss.teacher_probs(teacher_logits, temp)
        student_views = list(student_global_logits.chunk(N_GLOBAL))
        if student_local_logits is not None:
            student_views += list(student_local_logits.chunk(n_local))
        loss = self.dino_loss.cross_entropy(student_views, list(probs.chunk(N_GLOBAL)))
        if self.dino_loss.centering == "centering":
            self.dino_loss.update_center(teacher_logits)
        with torch.no_grad():
            entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
        return loss, probs, loss.detach() - entropy
