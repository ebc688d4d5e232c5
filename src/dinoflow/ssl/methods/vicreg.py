"""VICReg (Bardes, Ponce & LeCun 2022): invariance (MSE between the views' projections) + variance (hinge on
each dimension's std over the batch) + covariance (off-diagonal covariance squared). Loss: lightly's
``VICRegLoss`` on the projections of the global batch; lightly's VICReg projection head.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead

from dinoflow.ssl.methods._common import check_positive, gather
from dinoflow.ssl.methods.base import SSLMethod, TwoViews, pooled_views, register


@register
class VICReg(SSLMethod):
    name = "vicreg"
    family = "redundancy"

    @dataclass
    class Config:
        hidden_dim: int = 2048
        out_dim: int = 2048
        num_layers: int = 3
        lambda_param: float = 25.0   # invariance weight
        mu_param: float = 25.0       # variance weight
        nu_param: float = 1.0        # covariance weight

        def validate(self, name):
            check_positive(name, hidden_dim=self.hidden_dim, out_dim=self.out_dim, num_layers=self.num_layers)
            for key in ("lambda_param", "mu_param", "nu_param"):
                if getattr(self, key) < 0:
                    from dinoflow.errors import DinoflowError

                    raise DinoflowError(f"methods.{name}.{key}: must be >= 0")

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        self.projection_head = VICRegProjectionHead(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim,
                                                    num_layers=cfg.num_layers)
        self.criterion = VICRegLoss(lambda_param=cfg.lambda_param, mu_param=cfg.mu_param, nu_param=cfg.nu_param)

    def view_maker(self):
        return TwoViews.from_setup(self.setup)

    def training_step(self, batch, ctx):
        h0, h1 = pooled_views(self.backbone, batch.views[:2])
        loss = self.criterion(gather(self.projection_head(h0)), gather(self.projection_head(h1)))
        return {"loss": loss, "embeddings": h0.detach()}
