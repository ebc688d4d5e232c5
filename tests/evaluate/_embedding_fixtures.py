"""Embeddings with known health for the neighbours and health tests: a random timm DINOv2 ViT whose residual
branches are scaled by LayerScale (1e-5: every image embeds to nearly one vector; 1.0: healthy), and synthetic
"big common vector + tiny noise" rows."""

from __future__ import annotations

import numpy as np


def layerscale_vit_features(init_values: float, n: int = 200) -> np.ndarray:
    """(n, 32) float32 CLS embeddings of a randomly initialised timm `vit_small_patch14_dinov2` (tiny width,
    28 px) with LayerScale `init_values`, of `n` seeded random images of varied brightness, contrast and colour."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, embed_dim=32, depth=2,
                              num_heads=2, init_values=init_values, num_classes=0).eval()
    g = torch.Generator().manual_seed(0)
    imgs = (torch.rand(n, 3, 28, 28, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 4
            + torch.rand(n, 3, 1, 1, generator=g) * 4 - 2)
    with torch.no_grad():
        return model(imgs).numpy().astype(np.float32)


def common_vector_features(n: int = 300, d: int = 64, noise: float = 1e-6) -> np.ndarray:
    """One big common vector plus `noise` per coordinate, stored as float32 (as embeddings are)."""
    rng = np.random.default_rng(11)
    return (rng.normal(size=d) + noise * rng.normal(size=(n, d))).astype(np.float32)
