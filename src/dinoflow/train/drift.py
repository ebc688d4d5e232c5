"""How far training moved a model: per-image cosine between its initial and final embeddings.

`embedding_drift(initial, final, images, n_images, seed)` embeds a fixed seeded subset of the collection with both
encoders (CLS token / global pool, the model's eval preprocessing as `dinoflow embed`), takes the cosine of each
image's two embeddings (float64) and reports their median with a percentile-bootstrap 95% interval over images.
A median near 1 means training left the representation where it started (e.g. a fine-tune whose learning rate is
too small to move it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dinoflow.errors import DinoflowError

N_BOOTSTRAP = 1000


def drift_positions(n_total: int, n_images: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded random subset of min(n_images, n_total) images (all when n_total is smaller)."""
    if n_images < 1:
        raise DinoflowError(f"train.drift_images: must be >= 1, got {n_images}")
    if n_total < 1:
        raise DinoflowError("drift: no images to embed")
    rng = np.random.default_rng([int(seed), 0xD1F7])
    return np.sort(rng.choice(n_total, size=min(n_images, n_total), replace=False))


@torch.no_grad()
def cls_embeddings(encoder: Any, images: Any, positions: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, D) float64 CLS (ViT) / global-pool (CNN) embeddings of `images` at `positions`, encoder in eval mode.

    `images`: an `ImageStore` (`get(i)`) or a sequence of PIL images. Preprocessing is the encoder's timm
    data_config (resize the short side, centre crop, normalise), as the embed stage.
    """
    from dinoflow.data.transforms import EvalTransform, Normalize

    resize, normalize = EvalTransform(encoder.data_config), Normalize(encoder.data_config)
    was_training = encoder.training
    encoder.eval()
    param = next(encoder.parameters())
    out = []
    try:
        for start in range(0, len(positions), batch_size):
            batch = [resize(images.get(int(i)) if hasattr(images, "get") else images[int(i)])
                     for i in positions[start:start + batch_size]]
            x = normalize(torch.stack(batch)).to(param.device, param.dtype)
            out.append(encoder.forward_tokens(x)["cls"].double().cpu().numpy())
    finally:
        encoder.train(was_training)
    return np.concatenate(out)


def paired_cosine(a: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Cosine of each row of `a` with the same row of `b` (float64); 0 where either row has zero norm."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired_cosine: need two (N, D) arrays of one shape, got {a.shape} and {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("nd,nd->n", a, b)
    return np.clip(np.divide(dots, norms, out=np.zeros_like(dots), where=norms > eps), -1.0, 1.0)


def median_ci(values: np.ndarray, seed: int, n_resamples: int = N_BOOTSTRAP,
              level: float = 0.95) -> tuple[float, list[float]]:
    """(median, [lo, hi]): the median of `values` and its percentile-bootstrap interval (resampling the values).

    Raises ValueError on an empty or non-finite input."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or not np.isfinite(v).all():
        raise ValueError("median_ci: need a non-empty array of finite values")
    rng = np.random.default_rng([int(seed), 0xB007])
    medians = np.median(v[rng.integers(0, v.size, size=(n_resamples, v.size))], axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(medians, [alpha, 1.0 - alpha])
    return float(np.median(v)), [float(lo), float(hi)]


def embedding_drift(initial: Any, final: Any, images: Any, n_images: int, seed: int,
                    reference: str = "initial weights before training") -> dict[str, Any]:
    """Contract 2's `drift`: {"median_cosine", "ci95": [lo, hi], "n_images", "reference"} of the per-image cosine
    between `initial` and `final` embeddings (both `Encoder`s) on `drift_positions(len(images), n_images, seed)`."""
    positions = drift_positions(len(images), int(n_images), int(seed))
    cos = paired_cosine(cls_embeddings(initial, images, positions), cls_embeddings(final, images, positions))
    median, ci = median_ci(cos, seed)
    return {"median_cosine": median, "ci95": ci, "n_images": int(len(positions)), "reference": reference}
