"""KoLeo regulariser (Kozachenko-Leonenko entropy estimator; Sablayrolles et al. 2019, used by DINOv2).

``-mean_i log(||x_i - x_nn(i)|| + eps)`` over L2-normalised rows, ``nn(i)`` the nearest other row: it pushes the
features of a batch apart so they spread over the sphere. DINOv2 applies it to the student's CLS tokens of each
global view separately (``sum(koleo(x) for x in cls.chunk(2))``) so two views of one image are never neighbours.

Example:
    >>> import torch
    >>> from dinoflow.ssl.losses import KoLeoLoss
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # nearest neighbours sqrt(2) apart
    >>> round(float(KoLeoLoss()(x)), 4)  # -log(sqrt(2))
    -0.3466
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinoflow.errors import DinoflowError


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy regulariser on ``(B, D)`` features (B >= 2); computed in float32."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.pdist = nn.PairwiseDistance(p=2, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[0] < 2:
            raise DinoflowError(f"KoLeoLoss: needs a (B, D) batch with B >= 2, got shape {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):  # distances need full precision
            x = F.normalize(x.float(), p=2, dim=-1, eps=self.eps)
            with torch.no_grad():  # the neighbour index is a choice, not differentiated (as DINOv2)
                dots = x @ x.t()
                dots.fill_diagonal_(-2.0)  # below any cosine: a row is never its own neighbour
                nn_idx = dots.argmax(dim=1)
            dist = self.pdist(x, x[nn_idx])
            return -torch.log(dist + self.eps).mean()
