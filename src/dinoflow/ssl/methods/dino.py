"""DINO v1 (Caron et al. 2021): self-distillation with no labels. Student = backbone + DINO head (MLP, L2-normalised
bottleneck, weight-normalised prototypes); teacher = EMA of both, evaluated. Every global crop of the teacher
(sharpened by a low temperature, centred by an EMA of its mean output) is the target of every other student crop
(2 global + ``train.n_local_crops`` local). No iBOT, no KoLeo (that is ``dinov2``). Loss:
`dinoflow.ssl.losses.DINOLoss` with ``centering="centering"`` (equal to lightly's ``DINOLoss``; tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dinoflow.errors import DinoflowError
from dinoflow.ssl.heads import DINOHead
from dinoflow.ssl.losses import DINOLoss
from dinoflow.ssl.methods._common import N_GLOBAL, DINOTeacherMixin, check_momentum, check_positive
from dinoflow.ssl.methods.base import MultiCropViews, SSLMethod, make_teacher, register


@register
class DINO(DINOTeacherMixin, SSLMethod):
    name = "dino"
    family = "distillation"
    evaluated_network = "teacher"

    @dataclass
    class Config:
        out_dim: int = 4096
        hidden_dim: int = 1024
        bottleneck_dim: int = 256
        student_temp: float = 0.1
        teacher_temp: float = 0.04
        warmup_teacher_temp: float = 0.04
        warmup_teacher_temp_epochs: int = 0
        center_momentum: float = 0.9
        momentum: float = 0.996
        momentum_end: float = 1.0
        freeze_last_layer_epochs: int = 1

        def validate(self, name):
            check_positive(name, out_dim=self.out_dim, hidden_dim=self.hidden_dim,
                           bottleneck_dim=self.bottleneck_dim, student_temp=self.student_temp,
                           teacher_temp=self.teacher_temp, warmup_teacher_temp=self.warmup_teacher_temp)
            check_momentum(name, self.momentum, self.momentum_end)
            if not 0 <= self.center_momentum <= 1:
                raise DinoflowError(f"methods.{name}.center_momentum: must be in [0, 1]")
            for key in ("warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
                if getattr(self, key) < 0:
                    raise DinoflowError(f"methods.{name}.{key}: must be >= 0")

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        self.head = DINOHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim)
        self.teacher_backbone = make_teacher(backbone)
        self.teacher_head = make_teacher(self.head)
        self.dino_loss = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum, centering="centering")
        self.momentum = (cfg.momentum, cfg.momentum_end)

    def view_maker(self):
        return MultiCropViews(self.setup.views)

    def training_step(self, batch, ctx):
        global_x = torch.cat(batch.views[:N_GLOBAL])
        with torch.no_grad():
            t_cls = self.teacher_backbone.forward_tokens(global_x)["cls"]
            t_logits = self.teacher_head(t_cls)
        s_global = self.head(self.backbone.forward_tokens(global_x)["cls"])
        n_local = len(batch.views) - N_GLOBAL
        s_local = self.head(self.backbone.forward_tokens(torch.cat(batch.views[N_GLOBAL:]))["cls"]) if n_local else None
        loss, probs, kl = self.dino_cls_loss(t_logits, s_global, s_local, n_local, ctx.values["teacher/temp"])
        return {"loss": loss, "loss/dino": loss.detach(), "embeddings": t_cls.detach(), "targets": probs.detach(),
                "dino_kl": kl}
