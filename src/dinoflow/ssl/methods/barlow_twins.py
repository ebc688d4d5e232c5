"""Barlow Twins (Zbontar et al. 2021): the cross-correlation matrix of the two views' batch-normalised
projections is pushed to the identity (``sum (1 - C_ii)^2 + lambda * sum_{i!=j} C_ij^2``). Loss: lightly's
``BarlowTwinsLoss`` on the projections of the global batch; lightly's 3-layer projection head.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightly.loss import BarlowTwinsLoss
from lightly.models.modules.heads import BarlowTwinsProjectionHead

from dinoflow.ssl.methods._common import check_positive, gather
from dinoflow.ssl.methods.base import SSLMethod, TwoViews, pooled_views, register


@register
class BarlowTwins(SSLMethod):
    name = "barlow_twins"
    family = "redundancy"

    @dataclass
    class Config:
        hidden_dim: int = 2048
        out_dim: int = 2048
        lambda_param: float = 0.005   # weight of the off-diagonal terms

        def validate(self, name):
            check_positive(name, hidden_dim=self.hidden_dim, out_dim=self.out_dim, lambda_param=self.lambda_param)

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        self.projection_head = BarlowTwinsProjectionHead(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim)
        self.criterion = BarlowTwinsLoss(lambda_param=cfg.lambda_param)

    def view_maker(self):
        return TwoViews.from_setup(self.setup)

    def training_step(self, batch, ctx):
        h0, h1 = pooled_views(self.backbone, batch.views[:2])
        loss = self.criterion(gather(self.projection_head(h0)), gather(self.projection_head(h1)))
        return {"loss": loss, "embeddings": h0.detach()}
