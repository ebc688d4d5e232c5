"""BYOL (Grill et al. 2020): online network = backbone + projection + prediction MLP; target network = EMA of
backbone + projection. Loss: lightly's ``NegativeCosineSimilarity`` between the online prediction of one view
and the target projection of the other, symmetrised (``(ncs(p0, z1) + ncs(p1, z0)) / 2``); the online backbone is
the one evaluated, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
from torch import nn

from dinoflow.ssl.methods._common import check_momentum, check_positive
from dinoflow.ssl.methods.base import SSLMethod, TwoViews, make_teacher, pooled_views, register


@register
class BYOL(SSLMethod):
    name = "byol"
    family = "distillation"

    @dataclass
    class Config:
        hidden_dim: int = 4096
        out_dim: int = 256
        momentum: float = 0.99     # 0.996 in the paper (long runs); cosine to momentum_end
        momentum_end: float = 1.0

        def validate(self, name):
            check_positive(name, hidden_dim=self.hidden_dim, out_dim=self.out_dim)
            check_momentum(name, self.momentum, self.momentum_end)

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        self.projection_head = BYOLProjectionHead(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim)
        self.prediction_head = BYOLPredictionHead(cfg.out_dim, cfg.hidden_dim, cfg.out_dim)
        self.target_backbone = make_teacher(backbone)
        self.target_projection_head = make_teacher(self.projection_head)
        self.criterion = NegativeCosineSimilarity()
        self.momentum = (cfg.momentum, cfg.momentum_end)

    def view_maker(self):
        return TwoViews.from_setup(self.setup)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projection_head, self.target_projection_head)]

    def training_step(self, batch, ctx):
        h0, h1 = pooled_views(self.backbone, batch.views[:2])
        p0, p1 = (self.prediction_head(self.projection_head(h)) for h in (h0, h1))
        with torch.no_grad():
            t0, t1 = pooled_views(self.target_backbone, batch.views[:2])
            z0, z1 = self.target_projection_head(t0), self.target_projection_head(t1)
        loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        return {"loss": loss, "embeddings": h0.detach()}
