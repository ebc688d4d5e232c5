"""What the encoder looks at: last-layer CLS->patch attention (ViT) and feature-map saliency (CNN).

timm's attention uses `F.scaled_dot_product_attention`, which never materialises the attention weights.
`cls_attention` therefore captures the last block's qkv projection with a forward hook and recomputes
softmax(q k^T * scale) for the CLS query only: the forward pass itself is unchanged (fused kernel kept).
"""

from __future__ import annotations

import torch

from dinoflow.errors import DinoflowError
from dinoflow.models.encoder import Encoder


@torch.no_grad()
def cls_attention(encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N_patches): last-layer attention of the CLS token to every patch token (rows sum to <= 1;
    the remainder goes to the prefix tokens: CLS itself and registers)."""
    if not encoder.is_vit:
        raise DinoflowError(f"attention maps need a ViT; {encoder.arch} is a CNN (use feature_saliency)")
    attn = encoder.model.blocks[-1].attn
    if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "scale")):
        raise DinoflowError(f"{encoder.arch}: last block's attention has no fused qkv projection to hook")
    captured: list[torch.Tensor] = []
    handle = attn.qkv.register_forward_hook(lambda _m, _inp, out: captured.append(out))
    try:
        encoder.forward_tokens(x)
    finally:
        handle.remove()
    qkv = captured[-1]
    b, n, _ = qkv.shape
    head_dim = qkv.shape[-1] // (3 * attn.num_heads)
    q, k, _v = qkv.reshape(b, n, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)  # identities for DINOv2; qk-norm ViTs normalise here
    logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # (B, heads, 1, N_tokens)
    weights = logits.softmax(dim=-1)[:, :, 0]
    return weights[:, :, encoder.num_prefix_tokens:]


@torch.no_grad()
def feature_saliency(encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
    """(B, h, w): channel L2 norm of the last feature map (CNN), or of the patch tokens on their grid (ViT)."""
    if encoder.is_vit:
        h, w = encoder.patch_grid(x.shape[-2], x.shape[-1])
        return encoder.forward_tokens(x)["patch"].norm(dim=-1).reshape(x.shape[0], h, w)
    return encoder.forward_features(x).norm(dim=1)


def heads_to_grid(attn: torch.Tensor, encoder: Encoder, height: int, width: int) -> torch.Tensor:
    """(B, heads, N) -> (B, heads, h, w) on the patch grid of a height x width input."""
    h, w = encoder.patch_grid(height, width)
    return attn.reshape(attn.shape[0], attn.shape[1], h, w)
