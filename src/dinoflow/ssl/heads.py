"""DINO projection head: MLP, L2-normalised bottleneck, weight-normalised prototype layer (as DINOv2's DINOHead).

Example:
    >>> import torch
    >>> from dinoflow.ssl.heads import DINOHead, cancel_last_layer_gradients
    >>> head = DINOHead(in_dim=32, out_dim=64, hidden_dim=48, bottleneck_dim=16)
    >>> logits = head(torch.randn(5, 32))
    >>> logits.shape
    torch.Size([5, 64])
    >>> logits.sum().backward()
    >>> cancel_last_layer_gradients(head, epoch=0, freeze_last_layer_epochs=1)  # first epoch: prototypes frozen
    1
    >>> all(p.grad is None for p in head.last_layer.parameters())
    True
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from dinoflow.errors import DinoflowError


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, bias: bool = True) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim, bias=bias), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """``nlayers``-layer GELU MLP -> L2 normalisation -> weight-normalised linear layer to ``out_dim`` prototypes.

    The last layer is ``torch.nn.utils.parametrizations.weight_norm`` with its magnitude ``g`` fixed to 1 (not
    trained), so every prototype (row of the effective weight) has unit norm and the logits are cosine
    similarities. MLP weights use DINOv2's truncated-normal init (std 0.02, zero bias).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, mlp_bias: bool = True):
        super().__init__()
        for name, value in {"in_dim": in_dim, "out_dim": out_dim, "hidden_dim": hidden_dim,
                            "bottleneck_dim": bottleneck_dim, "nlayers": nlayers}.items():
            if int(value) != value or value < 1:
                raise DinoflowError(f"DINOHead: {name} must be a positive integer, got {value!r}")
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, bias=mlp_bias)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(False)  # DINO's norm_last_layer=True: unit-norm prototypes

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12  # fp16 cannot hold 1e-12
        x = nn.functional.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


def cancel_last_layer_gradients(module: nn.Module, epoch: int, freeze_last_layer_epochs: int) -> int:
    """Drop the gradients of every ``last_layer`` parameter in ``module`` while ``epoch < freeze_last_layer_epochs``.

    Call between ``loss.backward()`` and ``optimizer.step()`` (as DINO's ``cancel_gradients_last_layer``). With
    ``grad = None`` the optimiser skips those parameters entirely (no update, no weight decay). Works on a head or
    on any module that contains heads (e.g. a student ``ModuleDict``). Returns how many tensors were cleared.
    """
    if epoch >= freeze_last_layer_epochs:
        return 0
    cleared = 0
    for name, p in module.named_parameters():
        if "last_layer" in name.split(".") and p.grad is not None:
            p.grad = None
            cleared += 1
    return cleared
