"""SimCLR (Chen et al. 2020): two augmented views, a projection MLP, NT-Xent with the other images of the batch
as negatives. Loss: lightly's ``NTXentLoss`` on the projections of the *global* batch (gathered over processes).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightly.loss import NTXentLoss
from lightly.models.modules.heads import SimCLRProjectionHead

from dinoflow.ssl.methods._common import check_positive, gather
from dinoflow.ssl.methods.base import SSLMethod, TwoViews, pooled_views, register


@register
class SimCLR(SSLMethod):
    name = "simclr"
    family = "contrastive"

    @dataclass
    class Config:
        hidden_dim: int = 2048   # projection MLP width
        out_dim: int = 128       # projection size (where the loss is computed)
        temperature: float = 0.2

        def validate(self, name):
            check_positive(name, hidden_dim=self.hidden_dim, out_dim=self.out_dim, temperature=self.temperature)

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        self.projection_head = SimCLRProjectionHead(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim)
        self.criterion = NTXentLoss(temperature=cfg.temperature)

    def view_maker(self):
        return TwoViews.from_setup(self.setup)

    def training_step(self, batch, ctx):
        h0, h1 = pooled_views(self.backbone, batch.views[:2])
        z0, z1 = self.projection_head(h0), self.projection_head(h1)
        loss = self.criterion(gather(z0), gather(z1))
        return {"loss": loss, "embeddings": h0.detach()}
