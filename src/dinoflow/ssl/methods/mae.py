"""Masked autoencoder (He et al. 2022) as an `SSLMethod`, ViT backbones only: 75 % of the patches are hidden
(a per-sample mask drawn in the view seam), the ViT encodes the visible ones, a light transformer decoder
(lightly's ``MaskedVisionTransformerDecoderTIMM``) predicts the pixels of the hidden ones, and the loss is the
mean squared error on per-patch normalised pixels of the masked patches. Blocks: `dinoflow.ssl.pretext.mae`.

Batch seam: ``batch.views[0]`` ``(B, 3, S, S)`` the images, ``batch.targets["idx_keep"]`` ``(B, K)`` and
``targets["idx_mask"]`` ``(B, N - K)`` the visible / hidden patch indices (row-major over the patch grid).
A CNN backbone raises a DinoflowError when the method is built (`SSLMethod.check_backbone`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dinoflow.errors import DinoflowError
from dinoflow.ssl.methods.base import SSLMethod, Views, register
from dinoflow.ssl.pretext.common import check_patch_multiple, check_scale, numpy_rng
from dinoflow.ssl.pretext.mae import (MAEDecoder, MAEViews, VisibleEncoder, mae_loss, masked_patch_targets,
                                      to_sequence_index)


class MAEViewMaker:
    """Seam adapter: `MAEViews` -> ``Views([image], {"idx_keep", "idx_mask"})``."""

    def __init__(self, views: MAEViews):
        self.views = views

    def __call__(self, image: Any, rng: torch.Generator) -> Views:
        s = self.views(image, numpy_rng(rng))
        return Views([s["image"]], {"idx_keep": s["idx_keep"], "idx_mask": s["idx_mask"]})


@register
class MAE(SSLMethod):
    name = "mae"
    family = "masked"
    supports = frozenset({"vit"})

    @dataclass
    class Config:
        crop_size: int | None = None          # square input side in px (multiple of the patch); None: global crop
        mask_ratio: float = 0.75
        crop_scale: tuple[float, float] = (0.2, 1.0)    # the paper's RandomResizedCrop scale
        decoder_dim: int = 128                # the paper: 512 (a light decoder for CPU budgets)
        decoder_depth: int = 2                # the paper: 8
        decoder_num_heads: int = 4            # the paper: 16
        norm_pix_loss: bool = True            # per-patch normalised pixel targets (the paper's best)

        def validate(self, name: str) -> None:
            if self.crop_size is not None and self.crop_size < 1:
                raise DinoflowError(f"methods.{name}.crop_size: must be >= 1 or null, got {self.crop_size!r}")
            if not 0.0 < self.mask_ratio < 1.0:
                raise DinoflowError(f"methods.{name}.mask_ratio: must be in (0, 1), got {self.mask_ratio!r}")
            check_scale(f"methods.{name}", self.crop_scale)
            for key in ("decoder_dim", "decoder_depth", "decoder_num_heads"):
                if getattr(self, key) < 1:
                    raise DinoflowError(f"methods.{name}.{key}: must be >= 1, got {getattr(self, key)!r}")
            if self.decoder_dim % self.decoder_num_heads:
                raise DinoflowError(f"methods.{name}.decoder_dim ({self.decoder_dim}) must be divisible by "
                                    f"decoder_num_heads ({self.decoder_num_heads})")

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        self.crop_size = int(cfg.crop_size or setup.views.global_crop_size)
        check_patch_multiple(backbone, f"methods.{self.name}", "crop_size", self.crop_size)
        self._views = MAEViews(self.crop_size, backbone.patch_size, cfg.mask_ratio, cfg.crop_scale,
                               setup.views.mean, setup.views.std)
        self.visible_encoder = VisibleEncoder(backbone.model)  # plain object: adds no parameters
        self.decoder = MAEDecoder(backbone.embed_dim, self._views.n_patches, backbone.patch_size,
                                  backbone.num_prefix_tokens, cfg.decoder_dim, cfg.decoder_depth,
                                  cfg.decoder_num_heads)

    def view_maker(self) -> MAEViewMaker:
        return MAEViewMaker(self._views)

    def training_step(self, batch, ctx) -> dict[str, Any]:
        images = batch.views[0]
        prefix = self.backbone.num_prefix_tokens
        keep = to_sequence_index(batch.targets["idx_keep"], prefix, with_prefix=True)
        hidden = to_sequence_index(batch.targets["idx_mask"], prefix, with_prefix=False)
        encoded = self.visible_encoder(images, keep)
        prediction = self.decoder(encoded, keep, hidden)
        target = masked_patch_targets(images, self.backbone.patch_size, batch.targets["idx_mask"])
        loss = mae_loss(prediction, target, self.cfg.norm_pix_loss)
        # the pooled token of the visible-patch pass stands in for the embedding (no extra full pass)
        pooled_visible = encoded[:, 0] if prefix else encoded.mean(dim=1)
        return {"loss": loss, "embeddings": pooled_visible.detach()}
