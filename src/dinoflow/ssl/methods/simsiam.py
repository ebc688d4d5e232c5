"""SimSiam (Chen & He 2021): BYOL without the momentum encoder; the stop-gradient on the other branch's
projection prevents collapse. Loss: lightly's ``NegativeCosineSimilarity``,
``(ncs(p0, sg(z1)) + ncs(p1, sg(z0))) / 2``; lightly's SimSiam projection (3 layers, BN) and prediction heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules.heads import SimSiamPredictionHead, SimSiamProjectionHead

from dinoflow.ssl.methods._common import check_positive
from dinoflow.ssl.methods.base import SSLMethod, TwoViews, pooled_views, register


@register
class SimSiam(SSLMethod):
    name = "simsiam"
    family = "distillation"

    @dataclass
    class Config:
        hidden_dim: int = 2048
        out_dim: int = 2048
        pred_hidden_dim: int = 512

        def validate(self, name):
            check_positive(name, hidden_dim=self.hidden_dim, out_dim=self.out_dim,
                           pred_hidden_dim=self.pred_hidden_dim)

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        self.projection_head = SimSiamProjectionHead(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim)
        self.prediction_head = SimSiamPredictionHead(cfg.out_dim, cfg.pred_hidden_dim, cfg.out_dim)
        self.criterion = NegativeCosineSimilarity()

    def view_maker(self):
        return TwoViews.from_setup(self.setup)

    def training_step(self, batch, ctx):
        h0, h1 = pooled_views(self.backbone, batch.views[:2])
        z0, z1 = self.projection_head(h0), self.projection_head(h1)
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        loss = 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
        return {"loss": loss, "embeddings": h0.detach()}
