"""Relative patch position (Doersch et al. 2015) as an `SSLMethod`: the centre patch of a 3x3 grid (with gaps and
jitter) and one of its 8 neighbours go through the same backbone; a classifier on the concatenated pooled
embeddings predicts which neighbour it is (8-way cross-entropy). Views, head and loss:
`dinoflow.ssl.pretext.relative_position`.

Batch seam: ``batch.views[0]`` the centre patches, ``batch.views[1]`` the neighbours (``(B, 3, P, P)`` each),
``batch.targets["position"]`` ``(B,)`` the neighbour labels (0 = top-left ... 7 = bottom-right), and the patches'
``(top, left)`` in the grid crop in ``targets["anchor_box"]`` / ``targets["neighbour_box"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dinoflow.errors import DinoflowError
from dinoflow.ssl.methods.base import SSLMethod, Views, pooled, register
from dinoflow.ssl.pretext.common import check_patch_multiple, numpy_rng
from dinoflow.ssl.pretext.relative_position import (RelativePositionHead, RelativePositionViews,
                                                    relative_position_loss)


class RelativePositionViewMaker:
    """Seam adapter: `RelativePositionViews` -> ``Views([anchor, neighbour], {"position", "anchor_box",
    "neighbour_box"})``."""

    def __init__(self, views: RelativePositionViews):
        self.views = views

    def __call__(self, image: Any, rng: torch.Generator) -> Views:
        s = self.views(image, numpy_rng(rng))
        return Views([s["anchor"], s["neighbour"]], {"position": s["label"], "anchor_box": s["anchor_box"],
                                                     "neighbour_box": s["neighbour_box"]})


@register
class RelativePosition(SSLMethod):
    name = "relative_position"
    family = "pretext"

    @dataclass
    class Config:
        patch_size: int = 56                  # px; a multiple of the ViT patch size
        gap: int = 16                         # px between grid cells (the paper: half a patch)
        jitter: int = 4                       # px of random shift per patch and axis (<= gap / 2)
        crop_scale: tuple[float, float] = (0.6, 1.0)   # area of the random crop the grid is laid on
        color_drop: bool = False              # the paper's colour dropping (against chromatic-aberration shortcuts)
        head_hidden_dim: int = 512

        def validate(self, name: str) -> None:
            if self.patch_size < 1 or self.gap < 0 or self.jitter < 0 or self.head_hidden_dim < 1:
                raise DinoflowError(f"methods.{name}: patch_size and head_hidden_dim must be >= 1, gap and jitter "
                                    f">= 0 (got {self.patch_size}, {self.head_hidden_dim}, {self.gap}, {self.jitter})")

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        check_patch_multiple(backbone, f"methods.{self.name}", "patch_size", cfg.patch_size)
        self._views = RelativePositionViews(cfg.patch_size, cfg.gap, cfg.jitter, cfg.crop_scale,
                                            setup.views.mean, setup.views.std, color_drop=cfg.color_drop)
        self.head = RelativePositionHead(backbone.embed_dim, cfg.head_hidden_dim)

    def view_maker(self) -> RelativePositionViewMaker:
        return RelativePositionViewMaker(self._views)

    def training_step(self, batch, ctx) -> dict[str, Any]:
        anchor, neighbour = batch.views[0], batch.views[1]
        h = pooled(self.backbone, torch.cat([anchor, neighbour]))   # one pass through the shared backbone
        h_anchor, h_neighbour = h[: batch.size], h[batch.size:]
        logits = self.head(h_anchor, h_neighbour)
        labels = batch.targets["position"]
        loss = relative_position_loss(logits, labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "pretext/accuracy": accuracy.detach(), "embeddings": h_anchor.detach()}
