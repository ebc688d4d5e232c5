"""MoCo v2 (Chen et al. 2020, after He et al. 2020): a query encoder, a momentum (EMA) key encoder and a queue
of earlier keys as negatives; InfoNCE ``CE([q.k+, q.queue] / T, 0)``; 2-layer MLP head without BatchNorm.

The query sees view 0, the key encoder view 1 (``symmetric: true`` adds the swapped term, as MoCo v3 does).
The queue holds the keys of the last ``queue_size`` images of the global batch (persistent, seeded: resume is
bit-exact); the loss equals lightly's ``NTXentLoss`` with a memory bank holding the same queue (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightly.models.modules.heads import MoCoProjectionHead
from torch import nn

from dinoflow.ssl.methods._common import FeatureQueue, check_momentum, check_positive, gather, gather_no_grad, \
    info_nce
from dinoflow.ssl.methods.base import SSLMethod, TwoViews, make_teacher, pooled, register


@register
class MoCoV2(SSLMethod):
    name = "moco_v2"
    family = "contrastive"
    evaluated_network = "student"

    @dataclass
    class Config:
        hidden_dim: int = 2048
        out_dim: int = 128
        temperature: float = 0.2
        queue_size: int = 4096      # negatives kept from earlier batches (65536 in the paper)
        momentum: float = 0.99      # EMA of the key encoder, cosine to momentum_end (0.999 in the paper)
        momentum_end: float = 1.0
        symmetric: bool = False

        def validate(self, name):
            check_positive(name, hidden_dim=self.hidden_dim, out_dim=self.out_dim, temperature=self.temperature,
                           queue_size=self.queue_size)
            check_momentum(name, self.momentum, self.momentum_end)

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        self.projection_head = MoCoProjectionHead(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim)
        self.key_backbone = make_teacher(backbone)
        self.key_projection_head = make_teacher(self.projection_head)
        self.queue = FeatureQueue(cfg.queue_size, cfg.out_dim, seed=setup.seed)
        self.momentum = (cfg.momentum, cfg.momentum_end)

    def view_maker(self):
        return TwoViews.from_setup(self.setup)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.key_backbone), (self.projection_head, self.key_projection_head)]

    def exported_backbone(self):
        return self.backbone

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return nn.functional.normalize(self.key_projection_head(pooled(self.key_backbone, x)), dim=1)

    def training_step(self, batch, ctx):
        x0, x1 = batch.views[:2]
        h0 = pooled(self.backbone, x0)
        q0 = self.projection_head(h0)
        k1 = self._keys(x1)
        negatives = self.queue.features.clone()
        loss = info_nce(gather(q0), gather_no_grad(k1), negatives, self.cfg.temperature)
        keys = [k1]
        if self.cfg.symmetric:
            q1 = self.projection_head(pooled(self.backbone, x1))
            k0 = self._keys(x0)
            loss = 0.5 * (loss + info_nce(gather(q1), gather_no_grad(k0), negatives, self.cfg.temperature))
            keys.append(k0)
        for k in keys:
            self.queue.push(gather_no_grad(k))
        return {"loss": loss, "embeddings": h0.detach()}
