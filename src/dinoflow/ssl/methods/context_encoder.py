"""Context encoder (Pathak et al. 2016) as an `SSLMethod`: the backbone encodes an image whose central square (or
a random block) is filled with the mean colour; a decoder on the backbone's feature map (CNN) or patch tokens
(ViT) paints the image back; the loss is the L2 error on the region (+ an adversarial term, off by default).
Views, decoder, discriminator and losses: `dinoflow.ssl.pretext.context_encoder`.

Batch seam: ``batch.views[0]`` the masked images, ``batch.views[1]`` the full images (the reconstruction target,
never seen by the backbone), ``batch.targets["mask"]`` ``(B, 1, S, S)`` bool (True on the region) and
``targets["box"]`` ``(B, 4)`` its ``(top, left, h, w)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dinoflow.errors import DinoflowError
from dinoflow.ssl.methods.base import SSLMethod, Views, register
from dinoflow.ssl.pretext.common import check_patch_multiple, feature_grid, numpy_rng
from dinoflow.ssl.pretext.context_encoder import (REGIONS, ContextEncoderViews, InpaintingDecoder,
                                                  RegionDiscriminator, adversarial_losses, crop_regions,
                                                  reconstruction_loss, tokens_to_map)


class ContextEncoderViewMaker:
    """Seam adapter: `ContextEncoderViews` -> ``Views([masked, full], {"mask", "box"})``."""

    def __init__(self, views: ContextEncoderViews):
        self.views = views

    def __call__(self, image: Any, rng: torch.Generator) -> Views:
        s = self.views(image, numpy_rng(rng))
        return Views([s["image"], s["target"]], {"mask": s["mask"], "box": s["box"]})


@register
class ContextEncoder(SSLMethod):
    name = "context_encoder"
    family = "pretext"

    @dataclass
    class Config:
        crop_size: int | None = None          # square input side in px; None: train.global_crop_size
        region: str = "central"               # central | random_block
        region_fraction: float = 0.5          # side of the painted square / crop side (the paper: 0.5)
        decoder_dim: int = 256                # channels after the 1x1 input conv; halved per up-convolution
        adversarial_weight: float = 0.0       # the paper: 0.001; 0 = L2 only (no discriminator is built)
        discriminator_dim: int = 32
        CHOICES: ClassVar[dict] = {"region": REGIONS}

        def validate(self, name: str) -> None:
            if self.crop_size is not None and self.crop_size < 1:
                raise DinoflowError(f"methods.{name}.crop_size: must be >= 1 or null, got {self.crop_size!r}")
            if not 0.0 < self.region_fraction < 1.0:
                raise DinoflowError(f"methods.{name}.region_fraction: must be in (0, 1), got "
                                    f"{self.region_fraction!r}")
            if not 0.0 <= self.adversarial_weight < 1.0:
                raise DinoflowError(f"methods.{name}.adversarial_weight: must be in [0, 1), got "
                                    f"{self.adversarial_weight!r}")
            if self.decoder_dim < 1 or self.discriminator_dim < 1:
                raise DinoflowError(f"methods.{name}: decoder_dim and discriminator_dim must be >= 1")

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        self.crop_size = int(cfg.crop_size or setup.views.global_crop_size)
        check_patch_multiple(backbone, f"methods.{self.name}", "crop_size", self.crop_size)
        self._views = ContextEncoderViews(self.crop_size, cfg.region_fraction, cfg.region,
                                          setup.views.global_crop_scale, setup.views.mean, setup.views.std)
        self.grid = feature_grid(backbone, self.crop_size)
        self.decoder = InpaintingDecoder(backbone.embed_dim, self.grid, self.crop_size, cfg.decoder_dim)
        self.discriminator = (RegionDiscriminator(self._views.region_side, cfg.discriminator_dim)
                              if cfg.adversarial_weight > 0 else None)

    def view_maker(self) -> ContextEncoderViewMaker:
        return ContextEncoderViewMaker(self._views)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(feature map (B, D, g, g), pooled embedding (B, D))`` of the masked images."""
        if self.backbone.is_vit:
            out = self.backbone.forward_tokens(images)
            return tokens_to_map(out["patch"], (self.grid, self.grid)), out["cls"]
        fmap = self.backbone.forward_features(images)
        return fmap, fmap.mean(dim=(2, 3))

    def training_step(self, batch, ctx) -> dict[str, Any]:
        masked, full = batch.views[0], batch.views[1]
        mask = batch.targets["mask"]
        fmap, h = self.features(masked)
        prediction = self.decoder(fmap)
        rec = reconstruction_loss(prediction, full, mask)
        out: dict[str, Any] = {"loss/reconstruction": rec.detach(), "embeddings": h.detach()}
        if self.discriminator is None:
            out["loss"] = rec
            return out
        w = self.cfg.adversarial_weight
        boxes = batch.targets["box"]
        g_loss, d_loss = adversarial_losses(self.discriminator, crop_regions(full, boxes),
                                            crop_regions(prediction, boxes))
        out.update({"loss": (1 - w) * rec + w * g_loss + d_loss, "loss/adversarial": g_loss.detach(),
                    "loss/discriminator": d_loss.detach()})
        return out
