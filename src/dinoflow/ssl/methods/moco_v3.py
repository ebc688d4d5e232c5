"""MoCo v3 (Chen, Xie & He 2021): query encoder = backbone + 3-layer projection + 2-layer prediction MLP (with
BatchNorm); momentum encoder = EMA of backbone + projection; no queue: the other keys of the (global) batch are
the negatives. Loss, symmetrised as in the paper's pseudo-code:
``ctr(q1, k2) + ctr(q2, k1)`` with ``ctr(q, k) = CE(q k^T / T, arange(N)) * 2T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightly.models.modules.heads import MoCoProjectionHead
from torch import nn

from dinoflow.ssl.methods._common import check_momentum, check_positive, gather, gather_no_grad, info_nce
from dinoflow.ssl.methods.base import SSLMethod, TwoViews, make_teacher, pooled_views, register


@register
class MoCoV3(SSLMethod):
    name = "moco_v3"
    family = "contrastive"

    @dataclass
    class Config:
        hidden_dim: int = 2048
        out_dim: int = 256
        temperature: float = 0.2
        momentum: float = 0.99
        momentum_end: float = 1.0

        def validate(self, name):
            check_positive(name, hidden_dim=self.hidden_dim, out_dim=self.out_dim, temperature=self.temperature)
            check_momentum(name, self.momentum, self.momentum_end)

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        self.projection_head = MoCoProjectionHead(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim, num_layers=3,
                                                  batch_norm=True)
        self.prediction_head = MoCoProjectionHead(cfg.out_dim, cfg.hidden_dim, cfg.out_dim, num_layers=2,
                                                  batch_norm=True)
        self.momentum_backbone = make_teacher(backbone)
        self.momentum_projection_head = make_teacher(self.projection_head)
        self.momentum = (cfg.momentum, cfg.momentum_end)

    def view_maker(self):
        return TwoViews.from_setup(self.setup)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.momentum_backbone), (self.projection_head, self.momentum_projection_head)]

    def contrastive(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``CE(q k^T / T, arange) * 2T`` over the global batch (q with gradient, k without)."""
        t = self.cfg.temperature
        return info_nce(gather(q), gather_no_grad(k), None, t) * 2 * t

    def training_step(self, batch, ctx):
        h0, h1 = pooled_views(self.backbone, batch.views[:2])
        q0, q1 = (self.prediction_head(self.projection_head(h)) for h in (h0, h1))
        with torch.no_grad():
            m0, m1 = pooled_views(self.momentum_backbone, batch.views[:2])
            k0, k1 = self.momentum_projection_head(m0), self.momentum_projection_head(m1)
        loss = self.contrastive(q0, k1) + self.contrastive(q1, k0)
        return {"loss": loss, "embeddings": h0.detach()}
