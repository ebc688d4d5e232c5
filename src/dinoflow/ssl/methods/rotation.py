"""Rotation prediction (Gidaris et al. 2018) as an `SSLMethod`: every image is shown at ``rotations_per_image``
of the 4 right-angle rotations (all 4 by default, the paper's best setting); a classifier on the pooled embedding
predicts the rotation (4-way cross-entropy). Views, head and loss: `dinoflow.ssl.pretext.rotation`.

Batch seam: ``batch.views[r]`` ``(B, 3, S, S)`` is the r-th rotation of every image, ``batch.targets["rotation"]``
``(B, R)`` its labels (``k``: turned ``k * 90`` degrees counter-clockwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dinoflow.errors import DinoflowError
from dinoflow.ssl.methods.base import SSLMethod, Views, pooled, register
from dinoflow.ssl.pretext.common import check_patch_multiple, numpy_rng
from dinoflow.ssl.pretext.rotation import N_ROTATIONS, RotationHead, RotationViews, rotation_loss


class RotationViewMaker:
    """Seam adapter: `RotationViews` -> ``Views(crops=[rotation 1, ..., rotation R], targets={"rotation": (R,)})``."""

    def __init__(self, views: RotationViews):
        self.views = views

    def __call__(self, image: Any, rng: torch.Generator) -> Views:
        sample = self.views(image, numpy_rng(rng))
        return Views(list(sample["images"].unbind(0)), {"rotation": sample["labels"]})


@register
class Rotation(SSLMethod):
    name = "rotation"
    family = "pretext"

    @dataclass
    class Config:
        crop_size: int | None = None          # square input side in px; None: train.global_crop_size
        rotations_per_image: int = 4          # 4: all rotations of every image (Gidaris et al.); 1-3: random ones
        head_hidden_dim: int = 256            # 0: a linear classifier

        def validate(self, name: str) -> None:
            if self.crop_size is not None and self.crop_size < 1:
                raise DinoflowError(f"methods.{name}.crop_size: must be >= 1 or null, got {self.crop_size!r}")
            if not 1 <= self.rotations_per_image <= N_ROTATIONS:
                raise DinoflowError(f"methods.{name}.rotations_per_image: must be 1..4, got "
                                    f"{self.rotations_per_image!r}")
            if self.head_hidden_dim < 0:
                raise DinoflowError(f"methods.{name}.head_hidden_dim: must be >= 0, got {self.head_hidden_dim!r}")

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        self.crop_size = int(cfg.crop_size or setup.views.global_crop_size)
        check_patch_multiple(backbone, f"methods.{self.name}", "crop_size", self.crop_size)
        self.head = RotationHead(backbone.embed_dim, cfg.head_hidden_dim)

    def view_maker(self) -> RotationViewMaker:
        v = self.setup.views
        return RotationViewMaker(RotationViews(self.crop_size, v.global_crop_scale, self.cfg.rotations_per_image,
                                               v.mean, v.std))

    def training_step(self, batch, ctx) -> dict[str, Any]:
        images = torch.cat(batch.views)                       # (R * B, 3, S, S), rotation-major
        labels = batch.targets["rotation"].t().reshape(-1)    # (B, R) -> (R * B,) in the same order
        h = pooled(self.backbone, images)
        logits = self.head(h)
        loss = rotation_loss(logits, labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "pretext/accuracy": accuracy.detach(), "embeddings": h[: batch.size].detach()}
