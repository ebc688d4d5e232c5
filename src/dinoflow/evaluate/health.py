"""Embedding-health statistics shared by training monitors, the evaluation stages and the report.

RankMe: Garrido, Balestriero, Najman & LeCun, "RankMe: Assessing the downstream performance of pretrained
self-supervised representations by their rank", ICML 2023, eq. (1).
"""

from __future__ import annotations

import numpy as np


def rankme(x: np.ndarray, eps: float = 1e-7) -> float:
    """Effective rank of a set of embeddings: exp of the Shannon entropy of the normalised singular values.

    x: (N, D) embeddings (any float dtype; computed in float64). p_k = sigma_k / sum(sigma) + eps over the
    min(N, D) singular values; RankMe = exp(-sum_k p_k log p_k), between 1 (all rows on one line) and min(N, D)
    (a flat spectrum). Returns 0.0 for an all-zero or empty matrix. Raises ValueError when x is not 2-D or holds
    a non-finite value.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"rankme: expected a 2-D (N, D) matrix, got shape {x.shape}")
    if x.size == 0:
        return 0.0
    if not np.isfinite(x).all():
        raise ValueError("rankme: the embeddings hold NaN or infinite values")
    s = np.linalg.svd(x, compute_uv=False)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total + eps
    return float(np.exp(-(p * np.log(p)).sum()))
