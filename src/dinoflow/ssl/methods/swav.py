"""SwAV (Caron et al. 2020): online clustering. Each crop's normalised projection is scored against learnable
unit-norm prototypes; the codes of each high-resolution crop (Sinkhorn-Knopp equipartition over the global batch,
optionally with a queue of earlier batches' features) are predicted from every other crop (swapped prediction),
with multi-crop (2 global + ``train.n_local_crops`` local crops). Loss, heads and prototypes: lightly's
``SwaVLoss``, ``SwaVProjectionHead``, ``SwaVPrototypes``; the prototypes are re-normalised before every step and
frozen for the first ``freeze_prototypes_epochs`` (as the paper's first epoch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightly.loss import SwaVLoss
from lightly.models.modules.heads import SwaVProjectionHead, SwaVPrototypes
from torch import nn

from dinoflow.errors import DinoflowError
from dinoflow.ssl.methods._common import FeatureQueue, check_positive, gather, gather_no_grad
from dinoflow.ssl.methods.base import MultiCropViews, SSLMethod, pooled_views, register


@register
class SwAV(SSLMethod):
    name = "swav"
    family = "clustering"

    @dataclass
    class Config:
        hidden_dim: int = 2048
        out_dim: int = 128
        n_prototypes: int = 512          # 3000 on ImageNet
        temperature: float = 0.1
        sinkhorn_iterations: int = 3
        sinkhorn_epsilon: float = 0.05
        queue_size: int = 0              # 0: no queue; else features of earlier batches used in Sinkhorn
        start_queue_epoch: int = 0
        freeze_prototypes_epochs: int = 1

        def validate(self, name):
            check_positive(name, hidden_dim=self.hidden_dim, out_dim=self.out_dim, n_prototypes=self.n_prototypes,
                           temperature=self.temperature, sinkhorn_iterations=self.sinkhorn_iterations,
                           sinkhorn_epsilon=self.sinkhorn_epsilon)
            for key in ("queue_size", "start_queue_epoch", "freeze_prototypes_epochs"):
                if getattr(self, key) < 0:
                    raise DinoflowError(f"methods.{name}.{key}: must be >= 0")

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        self.projection_head = SwaVProjectionHead(backbone.embed_dim, cfg.hidden_dim, cfg.out_dim)
        self.prototypes = SwaVPrototypes(cfg.out_dim, cfg.n_prototypes)
        self.criterion = SwaVLoss(temperature=cfg.temperature, sinkhorn_iterations=cfg.sinkhorn_iterations,
                                  sinkhorn_epsilon=cfg.sinkhorn_epsilon)
        self.queues = nn.ModuleList([FeatureQueue(cfg.queue_size, cfg.out_dim, seed=setup.seed + i)
                                     for i in range(2)]) if cfg.queue_size else None

    def view_maker(self):
        return MultiCropViews(self.setup.views)

    def after_backward(self, ctx) -> None:
        if ctx.epoch < self.cfg.freeze_prototypes_epochs:
            for p in self.prototypes.parameters():
                p.grad = None

    def training_step(self, batch, ctx):
        with torch.no_grad():
            for layer in self.prototypes.heads:
                layer.weight.copy_(F.normalize(layer.weight, dim=1))
        # as the official SwAV code (src/resnet50.py ResNet.forward): one backbone call per resolution, BatchNorm
        # statistics over its crops included, then the projection head once on every crop's embedding
        embeddings = pooled_views(self.backbone, batch.views, multi_crop=True)
        projected = F.normalize(self.projection_head(torch.cat(embeddings)), dim=1)
        features = list(projected.split([int(h.shape[0]) for h in embeddings]))
        outputs = [gather(self.prototypes(f)) for f in features]
        high, low = outputs[:2], outputs[2:]
        queue_outputs = None
        if self.queues is not None and ctx.epoch >= self.cfg.start_queue_epoch \
                and int(self.queues[0].filled) == self.queues[0].size:
            with torch.no_grad():
                queue_outputs = [self.prototypes(q.features) for q in self.queues]
        loss = self.criterion(high, low, queue_outputs).reshape(())
        if self.queues is not None:
            for q, f in zip(self.queues, features[:2]):
                q.push(gather_no_grad(f))
        return {"loss": loss, "embeddings": embeddings[0].detach()}
