"""Tiny backbones shared by the model tests (real timm architectures and key names, toy sizes)."""

from __future__ import annotations

import torch

from dinoflow.models.encoder import Encoder

VIT = "vit_small_patch14_dinov2"
VIT_REG = "vit_small_patch14_reg4_dinov2"
TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2}
IMG = 28  # 2 x 2 patches of 14 px


def tiny_vit(arch: str = VIT, seed: int = 0, depth: int = 4, img_size: int = IMG) -> Encoder:
    torch.manual_seed(seed)
    enc = Encoder(arch, img_size, {**TINY, "depth": depth})
    # Random non-trivial values everywhere (timm inits layer scale to 1e-5 and biases to 0, which would let
    # a wrong mapping of those tensors pass unnoticed).
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return enc.eval()


def images(n: int = 3, size: int = IMG, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
