"""KoLeoLoss against a brute-force nearest-neighbour formula, a known answer, and lightly.loss.KoLeoLoss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinoflow.errors import DinoflowError
from dinoflow.ssl.losses import KoLeoLoss


def _brute_force(x: np.ndarray, eps: float = 1e-8) -> float:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    terms = []
    for i in range(len(x)):
        d = min(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)
        terms.append(-math.log(d + eps))
    return float(np.mean(terms))


@pytest.mark.parametrize("seed, shape", [(0, (7, 5)), (1, (16, 3)), (2, (2, 8))])
def test_matches_brute_force(seed, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    assert KoLeoLoss()(x).item() == pytest.approx(_brute_force(x.double().numpy()), rel=1e-5, abs=1e-6)


def test_known_answer_square_on_circle():
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.0, -0.5]])  # norms do not matter
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(math.sqrt(2.0)), rel=1e-6)


def test_matches_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(3))
    assert KoLeoLoss()(x).item() == pytest.approx(lightly_loss.KoLeoLoss()(x).item(), rel=1e-6)


def test_gradient_spreads_points():
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(4))
    x[1] = x[0] + 0.01  # two almost identical points: the loss is large and must fall after a step
    x.requires_grad_()
    loss = KoLeoLoss()(x)
    loss.backward()
    with torch.no_grad():
        after = KoLeoLoss()(x - 0.01 * x.grad)
    assert after < loss


def test_bad_shape_raises():
    with pytest.raises(DinoflowError, match="B >= 2"):
        KoLeoLoss()(torch.zeros(1, 4))
