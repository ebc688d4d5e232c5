"""DINOv2 (Oquab et al. 2023; ``SSLMetaArch``): DINO self-distillation + iBOT masked-patch prediction + KoLeo.

One step (the engine does the optimizer, schedules, EMA and clipping around it):

1. the teacher (EMA of student backbone + head, evaluated) sees the 2 global crops: CLS logits, and for ViTs the
   logits of the patch tokens the student sees masked (iBOT block masks drawn per *global* batch in
   `batch_extras`, seeded by (seed, epoch, global batch), as DINOv2's collate);
2. the student sees the global crops with the masked patches replaced by the mask token, and the local crops;
3. loss = DINO CLS loss (teacher centred or Sinkhorn-Knopp; every teacher global view against every other student
   view) + ``ibot_loss_weight`` * iBOT masked-patch loss (ViTs) + ``koleo_loss_weight`` * KoLeo on the student's
   global CLS tokens of the global batch;
4. after backward the prototypes (head last layer) stay frozen for ``freeze_last_layer_epochs``.

The DINO head is shared by the CLS token and the masked patch tokens (DINOv2's default). Losses:
`dinoflow.ssl.losses` (DINOLoss, iBOTPatchLoss, KoLeoLoss; each tested against its formula / DINOv2's code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from dinoflow.errors import DinoflowError
from dinoflow.ssl.heads import DINOHead
from dinoflow.ssl.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinoflow.ssl.losses.dino import CENTERING_MODES
from dinoflow.ssl.masking import MaskingGenerator, check_mask_params, sample_masks
from dinoflow.ssl.methods._common import N_GLOBAL, DINOTeacherMixin, check_momentum, check_positive
from dinoflow.ssl.methods.base import MultiCropViews, SSLMethod, make_teacher, register
from dinoflow.train.distributed import all_gather_with_grad



def head_logits(backbone, head: nn.Module, global_crops: torch.Tensor, local_crops: torch.Tensor | None,
                masks: torch.Tensor | None, hide_masked: bool) -> dict[str, torch.Tensor | None]:
    """Head logits of the global CLS tokens, of the patch tokens at ``masks`` (one head call for both), and of
    the local CLS tokens; the student hides the masked patches (``hide_masked``), the teacher sees them."""
    g = backbone.forward_tokens(global_crops, masks if hide_masked else None)
    n_cls = g["cls"].shape[0]
    tokens = [g["cls"]]
    if masks is not None:
        tokens.append(g["patch"].flatten(0, 1)[masks.flatten()])
    logits = head(torch.cat(tokens))
    out: dict[str, torch.Tensor | None] = {"cls": g["cls"], "global_logits": logits[:n_cls],
                                            "patch_logits": logits[n_cls:] if masks is not None else None,
                                            "local_logits": None}
    if local_crops is not None:
        out["local_logits"] = head(backbone.forward_tokens(local_crops)["cls"])
    return out


@register
class DINOv2(DINOTeacherMixin, SSLMethod):
    name = "dinov2"
    family = "distillation"
    evaluated_network = "teacher"

    @dataclass
    class Config:
        out_dim: int = 4096                      # prototypes of the DINO head
        hidden_dim: int = 1024
        bottleneck_dim: int = 256
        student_temp: float = 0.1
        teacher_temp: float = 0.07
        warmup_teacher_temp: float = 0.04
        warmup_teacher_temp_epochs: int = 1
        centering: str = "sinkhorn_knopp"         # sinkhorn_knopp (DINOv2) | centering (DINO EMA centre)
        momentum: float = 0.98                    # teacher EMA start, cosine to momentum_end (0.992-0.996 on GPUs)
        momentum_end: float = 1.0
        freeze_last_layer_epochs: int = 1
        ibot_loss_weight: float = 1.0
        mask_ratio: tuple[float, float] = (0.1, 0.5)
        mask_probability: float = 0.5
        koleo_loss_weight: float = 0.1

        CHOICES: ClassVar[dict] = {"centering": CENTERING_MODES}

        def validate(self, name):
            check_positive(name, out_dim=self.out_dim, hidden_dim=self.hidden_dim,
                           bottleneck_dim=self.bottleneck_dim, student_temp=self.student_temp,
                           teacher_temp=self.teacher_temp, warmup_teacher_temp=self.warmup_teacher_temp)
            check_momentum(name, self.momentum, self.momentum_end)
            if self.centering not in CENTERING_MODES:
                raise DinoflowError(f"methods.{name}.centering: {self.centering!r} is not one of "
                                    f"{', '.join(CENTERING_MODES)}")
            for key in ("warmup_teacher_temp_epochs", "freeze_last_layer_epochs", "ibot_loss_weight",
                        "koleo_loss_weight"):
                if getattr(self, key) < 0:
                    raise DinoflowError(f"methods.{name}.{key}: must be >= 0")
            try:
                check_mask_params(self.mask_ratio, self.mask_probability)
            except DinoflowError as exc:
                raise DinoflowError(f"methods.{name}: {exc}") from exc

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        self.head = DINOHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim)
        self.teacher_backbone = make_teacher(backbone)
        self.teacher_head = make_teacher(self.head)
        self.dino_loss = DINOLoss(cfg.out_dim, cfg.student_temp, centering=cfg.centering)
        self.ibot_loss = iBOTPatchLoss(cfg.out_dim, cfg.student_temp, centering=cfg.centering)
        self.koleo_loss = KoLeoLoss()
        self.momentum = (cfg.momentum, cfg.momentum_end)
        self.use_ibot = backbone.is_vit and cfg.ibot_loss_weight > 0
        self.mask_generator = None
        if self.use_ibot:
            size = setup.views.global_crop_size
            if size % backbone.patch_size:
                raise DinoflowError(f"train.global_crop_size ({size}) must be a multiple of the patch size "
                                    f"({backbone.patch_size}) for iBOT masks")
            grid = size // backbone.patch_size
            self.mask_generator = MaskingGenerator(grid, max_num_patches=0.5 * grid * grid)

    # -- data
    def view_maker(self):
        return MultiCropViews(self.setup.views)

    def batch_extras(self, n_global: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """iBOT masks of the 2 global crops of every image of the global batch: ``(n_global, 2, N)`` bool (drawn
        view-major over ``2 * n_global`` crops, as DINOv2's collate)."""
        if self.mask_generator is None:
            return {}
        masks = sample_masks(N_GLOBAL * n_global, self.mask_generator, self.cfg.mask_ratio,
                             self.cfg.mask_probability, rng)["masks"]
        return {"masks": masks.reshape(N_GLOBAL, n_global, -1).transpose(0, 1).contiguous()}

    # -- the step
    def training_step(self, batch, ctx):
        global_crops = torch.cat(batch.views[:N_GLOBAL])
        local_crops = torch.cat(batch.views[N_GLOBAL:]) if len(batch.views) > N_GLOBAL else None
        n_local = len(batch.views) - N_GLOBAL
        masks = None
        if "masks" in batch.extras:  # (b, 2, N) -> view-major (2b, N), the order of global_crops
            masks = batch.extras["masks"].transpose(0, 1).reshape(N_GLOBAL * batch.size, -1)
        temp = ctx.values["teacher/temp"]
        with torch.no_grad():
            t_out = head_logits(self.teacher_backbone, self.teacher_head, global_crops, None, masks, False)
        s_out = head_logits(self.backbone, self.head, global_crops, local_crops, masks, True)

        # DINO: every teacher global view against every other student view (global and local).
        dino, t_probs, dino_kl = self.dino_cls_loss(t_out["global_logits"], s_out["global_logits"],
                                                    s_out["local_logits"], n_local, temp)
        terms = {"dino": dino}
        if masks is not None:
            terms["ibot"] = self.cfg.ibot_loss_weight * self.ibot_loss(s_out["patch_logits"], t_out["patch_logits"],
                                                                        masks, temp)
        if self.cfg.koleo_loss_weight > 0:
            # Per global view, over the global batch (gathered) so it does not depend on the process count.
            koleo = sum(self.koleo_loss(all_gather_with_grad(x)) for x in s_out["cls"].chunk(N_GLOBAL))
            terms["koleo"] = self.cfg.koleo_loss_weight * koleo
        loss = sum(terms.values())

        # Collapse monitors (the engine's, from the teacher's targets and CLS embeddings) and the KL part of the loss.
        out = {f"loss/{k}": v.detach() for k, v in terms.items()}
        out.update({"loss": loss, "embeddings": t_out["cls"].detach(), "targets": t_probs.detach(),
                    # CE - H(teacher) = KL(teacher || student): the part of the DINO loss the student can reduce
                    # (the CE itself rises while the teacher temperature warms up).
                    "dino_kl": dino_kl})
        return out
