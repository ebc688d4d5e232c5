"""Jigsaw puzzles (Noroozi & Favaro 2016) as an `SSLMethod`: 3x3 tiles shuffled by one permutation of a fixed set
(greedy maximal minimum Hamming distance, seeded by ``permutation_seed``), each tile through the same backbone, a
classifier on the concatenated tile embeddings predicts the permutation index. Views, permutation set, head and
loss: `dinoflow.ssl.pretext.jigsaw`.

Batch seam: ``batch.views[i]`` ``(B, 3, T, T)`` is input position ``i`` (= original tile ``perm[i]``),
``batch.targets["permutation"]`` ``(B,)`` the permutation index into ``method.permutations``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dinoflow.errors import DinoflowError
from dinoflow.ssl.methods.base import SSLMethod, Views, pooled, register
from dinoflow.ssl.pretext.common import check_patch_multiple, numpy_rng
from dinoflow.ssl.pretext.jigsaw import (N_TILES, JigsawHead, JigsawViews, hamming_permutation_set, jigsaw_loss,
                                         min_hamming_distance)
from dinoflow.utils import get_logger

log = get_logger(__name__)


class JigsawViewMaker:
    """Seam adapter: `JigsawViews` -> ``Views([tile at input position 0, ..., 8], {"permutation": index})``."""

    def __init__(self, views: JigsawViews):
        self.views = views

    def __call__(self, image: Any, rng: torch.Generator) -> Views:
        s = self.views(image, numpy_rng(rng))
        return Views(list(s["tiles"].unbind(0)), {"permutation": s["label"]})


@register
class Jigsaw(SSLMethod):
    name = "jigsaw"
    family = "pretext"

    @dataclass
    class Config:
        tile_size: int = 42                   # px; a multiple of the ViT patch size
        cell_size: int = 50                   # px per grid cell (cell - tile = jitter room); crop = 3 * cell
        n_permutations: int = 100             # the paper: 1000 (best), 100 in its ablations
        permutation_seed: int = 0             # the permutation set is a fixed property of the method
        normalize_tiles: bool = True          # per-tile mean/std normalisation (the paper)
        crop_scale: tuple[float, float] = (0.6, 1.0)
        tile_dim: int = 256                   # per-tile layer (the paper's fc6: 512)
        head_hidden_dim: int = 1024           # the paper's fc7: 4096

        def validate(self, name: str) -> None:
            for key in ("tile_size", "cell_size", "tile_dim", "head_hidden_dim"):
                if getattr(self, key) < 1:
                    raise DinoflowError(f"methods.{name}.{key}: must be >= 1, got {getattr(self, key)!r}")
            if self.tile_size > self.cell_size:
                raise DinoflowError(f"methods.{name}.tile_size ({self.tile_size}) must not exceed cell_size "
                                    f"({self.cell_size})")
            if self.n_permutations < 2:
                raise DinoflowError(f"methods.{name}.n_permutations: must be >= 2, got {self.n_permutations!r}")

    def __init__(self, backbone, cfg, setup):
        super().__init__(backbone, cfg, setup)
        check_patch_multiple(backbone, f"methods.{self.name}", "tile_size", cfg.tile_size)
        self.permutations = hamming_permutation_set(cfg.n_permutations, N_TILES, cfg.permutation_seed)
        log.info("jigsaw: %d permutations, minimum Hamming distance %d", len(self.permutations),
                 min_hamming_distance(self.permutations))
        self._views = JigsawViews(cfg.tile_size, cfg.cell_size, self.permutations, cfg.crop_scale,
                                  cfg.normalize_tiles, setup.views.mean, setup.views.std)
        self.head = JigsawHead(backbone.embed_dim, cfg.n_permutations, cfg.tile_dim, cfg.head_hidden_dim)

    def view_maker(self) -> JigsawViewMaker:
        return JigsawViewMaker(self._views)

    def training_step(self, batch, ctx) -> dict[str, Any]:
        tiles = torch.cat(batch.views[:N_TILES])              # (9 * B, 3, T, T), position-major
        h = pooled(self.backbone, tiles)
        per_image = h.view(N_TILES, batch.size, -1).transpose(0, 1)   # (B, 9, D) in input order
        logits = self.head(per_image)
        labels = batch.targets["permutation"]
        loss = jigsaw_loss(logits, labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "pretext/accuracy": accuracy.detach(), "embeddings": h[: batch.size].detach()}
